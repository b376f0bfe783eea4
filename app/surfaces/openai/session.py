"""Which session a /v1 call belongs to: the `X-Session-Id` header, else the request's `user`
(either as a digest when it holds personal data: app.safety.session_ids), else none
(NO_SESSION): then only the tenant's day and month budgets hold the call."""

from __future__ import annotations

from typing import Protocol

from fastapi import Request

from app.safety.session_ids import SessionIds
from app.store import NO_SESSION
from app.surfaces.openai.errors import OpenAIError
from app.surfaces.openai.messages import SESSION_ID_RULE, valid_session_id


class NamesAUser(Protocol):
    """A /v1 request body: chat completions and embeddings both take OpenAI's `user`."""

    @property
    def user(self) -> str | None: ...


def session_of(request: Request, body: NamesAUser, session_ids: SessionIds) -> str:
    """The stored session id (a digest when the one sent holds personal data), or NO_SESSION."""
    header = request.headers.get("x-session-id")
    if header is not None:
        if not valid_session_id(header):
            raise OpenAIError(400, f"X-Session-Id must be {SESSION_ID_RULE}", param="X-Session-Id")
        return session_ids.stored(header)
    return session_ids.stored(body.user) if body.user else NO_SESSION
