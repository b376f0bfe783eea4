"""Conversation state that travels in CXone's `botSessionState`, signed so it cannot be forged.

CXone echoes back whatever the previous response put there, so any replica can serve the next
turn without shared storage. Because the caller hands it back to us, it is untrusted input: a
state whose signature does not verify, whose version is unknown or that is too large starts a
new session instead (and is counted), never being believed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("cxrelay.cxone")

STATE_VERSION = 1
Rejection = Literal["", "missing", "tampered", "oversized", "malformed"]


@dataclass
class BotSession:
    session_id: str
    history: list[dict[str, str]] = field(default_factory=list)  # {"role", "content"}
    turns: int = 0
    no_input_streak: int = 0
    failure_streak: int = 0
    started_at: float = field(default_factory=time.time)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rejected: Rejection = ""  # why an incoming state was not used ("" when it was)

    @classmethod
    def new(cls, rejected: Rejection = "missing") -> BotSession:
        return cls(session_id=uuid.uuid4().hex, rejected=rejected)

    @property
    def is_new(self) -> bool:
        return self.rejected != ""

    def payload(self) -> dict[str, Any]:
        return {
            "sid": self.session_id,
            "history": self.history,
            "turns": self.turns,
            "noInput": self.no_input_streak,
            "failures": self.failure_streak,
            "started": int(self.started_at),
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
        }

    def add_exchange(self, user: str, assistant: str, *, max_messages: int, max_chars: int) -> None:
        """Append a turn, then drop the oldest messages until both bounds hold."""
        if user:
            self.history.append({"role": "user", "content": user})
        if assistant:
            self.history.append({"role": "assistant", "content": assistant})
        while self.history and (
            len(self.history) > max_messages
            or sum(len(m["content"]) for m in self.history) > max_chars
        ):
            self.history.pop(0)


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class StateCodec:
    """Signs outgoing state and verifies incoming state with HMAC-SHA256."""

    def __init__(self, secret: bytes, max_bytes: int) -> None:
        self._secret = secret
        self._max_bytes = max_bytes

    def _signature(self, payload: dict[str, Any]) -> str:
        return hmac.new(self._secret, _canonical(payload), hashlib.sha256).hexdigest()

    def encode(self, session: BotSession) -> dict[str, Any]:
        payload = session.payload()
        return {"v": STATE_VERSION, "state": payload, "sig": self._signature(payload)}

    def decode(self, raw: object) -> BotSession:
        if raw is None or raw == "" or raw == {}:
            return BotSession.new("missing")
        if isinstance(raw, str):  # some scripts hand the state back as a JSON string
            if len(raw) > self._max_bytes:
                return self._reject("oversized")
            try:
                raw = json.loads(raw)
            except ValueError:
                return self._reject("malformed")
        if not isinstance(raw, dict) or raw.get("v") != STATE_VERSION:
            return self._reject("malformed")
        payload, signature = raw.get("state"), raw.get("sig")
        if not isinstance(payload, dict) or not isinstance(signature, str):
            return self._reject("malformed")
        if len(_canonical(payload)) > self._max_bytes:
            return self._reject("oversized")
        if not hmac.compare_digest(self._signature(payload), signature):
            return self._reject("tampered")
        try:
            return BotSession(
                session_id=str(payload["sid"]),
                history=[
                    {"role": str(m["role"]), "content": str(m["content"])}
                    for m in payload["history"]
                    if m.get("role") in ("user", "assistant")
                ],
                turns=int(payload["turns"]),
                no_input_streak=int(payload["noInput"]),
                failure_streak=int(payload["failures"]),
                started_at=float(payload["started"]),
                prompt_tokens=int(payload.get("promptTokens", 0)),
                completion_tokens=int(payload.get("completionTokens", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return self._reject("malformed")

    @staticmethod
    def _reject(reason: Rejection) -> BotSession:
        log.warning("botSessionState rejected; starting a new session", extra={"reason": reason})
        return BotSession.new(reason)
