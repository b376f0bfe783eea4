"""Conversation context from NICE CXone's Digital Engagement API.

History comes from `GET /dfo/3.0/contacts/{contactId}/messages`, newest first, following
`scrollToken` pagination until enough turns are in hand. The API host is configured or discovered
from `/.well-known/cxone-configuration` for the tenant (taken from settings or from the access
token's `tenantId` claim). A 401 means the cached token was revoked: it is dropped and the call is
made once more with a fresh one.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx

from app.core.deadline import Deadline
from app.core.errors import (
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.observability import tracing
from app.upstream.http_client import UpstreamClient
from app.upstream.oauth import TokenCache

UPSTREAM = "cxone"
MAX_PAGE_SIZE = 50


@dataclass(frozen=True)
class Turn:
    """One message of the conversation, as the prompt templates see it."""

    role: Literal["customer", "agent"]
    text: str
    created_at: str = ""


def _jwt_claim(token: str, claim: str) -> str | None:
    """Read a claim from a JWT without verifying it: only used to route to the tenant's area."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    value = data.get(claim) if isinstance(data, dict) else None
    return str(value) if value else None


def _turn_from(message: dict[str, Any]) -> Turn | None:
    content = message.get("messageContent") or {}
    text = content.get("text") or (content.get("payload") or {}).get("text")
    if not isinstance(text, str) or not text.strip():
        return None  # attachments, postbacks and rich content carry no text for the prompt
    role: Literal["customer", "agent"] = (
        "customer" if str(message.get("direction", "")).lower() == "inbound" else "agent"
    )
    return Turn(role=role, text=text, created_at=str(message.get("createdAt", "")))


@dataclass(eq=False, repr=False)  # its token cache holds the client secret
class CXoneContextClient:
    """Fetches recent turns of a digital contact; raises UpstreamError subclasses on failure.
    `api_base_url`, when not configured, is discovered once and kept."""

    http: httpx.AsyncClient
    tokens: TokenCache
    _: KW_ONLY
    api_base_url: str | None
    discovery_url: str
    tenant_id: str | None
    timeout_seconds: float
    _discovery_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def fetch_history(
        self, contact_id: str, max_turns: int, deadline: Deadline
    ) -> list[Turn]:
        """The last `max_turns` text turns, oldest first (the order a prompt reads them in)."""
        if max_turns <= 0:
            return []
        with tracing.span("cxone.history", {"cxone.history.max_turns": max_turns}):
            turns = await self._fetch_history(contact_id, max_turns, deadline)
            tracing.annotate({"cxone.history.turns": len(turns)})
            return turns

    async def _fetch_history(
        self, contact_id: str, max_turns: int, deadline: Deadline
    ) -> list[Turn]:
        newest_first: list[Turn] = []
        scroll_token: str | None = None
        while len(newest_first) < max_turns:
            params: dict[str, str | int] = {
                "sorting": "createdAt",
                "sortingType": "desc",
                "limit": min(MAX_PAGE_SIZE, max_turns - len(newest_first)),
            }
            if scroll_token:
                params["scrollToken"] = scroll_token
            page = await self._get_json(
                f"/dfo/3.0/contacts/{path_segment(contact_id)}/messages", params, deadline
            )
            messages = page.get("messages")
            if not isinstance(messages, list):
                raise UpstreamProtocolError("messages response has no list", upstream=UPSTREAM)
            newest_first.extend(t for m in messages if isinstance(m, dict) and (t := _turn_from(m)))
            scroll_token = page.get("scrollToken") or None
            if not messages or not scroll_token:
                break
        return list(reversed(newest_first[:max_turns]))

    async def _get_json(
        self, path: str, params: dict[str, str | int], deadline: Deadline
    ) -> dict[str, Any]:
        base = await self._base_url(deadline)
        for attempt in (1, 2):
            token = await self.tokens.get()
            response = await self._get(base + path, deadline, params=params, token=token)
            if response.status_code == 401 and attempt == 1:
                self.tokens.invalidate(token)
                continue
            return self._json_or_raise(response)
        raise AssertionError("unreachable: the second attempt always returns or raises")

    async def _base_url(self, deadline: Deadline) -> str:
        if self.api_base_url:
            return self.api_base_url
        async with self._discovery_lock:
            if self.api_base_url:
                return self.api_base_url
            tenant = self.tenant_id or _jwt_claim(await self.tokens.get(), "tenantId")
            if not tenant:
                raise UpstreamRejected(
                    "CXone API host unknown: set CXONE_API_BASE_URL or CXONE_TENANT_ID",
                    upstream=UPSTREAM,
                )
            response = await self._get(self.discovery_url, deadline, params={"tenantId": tenant})
            endpoint = self._json_or_raise(response).get("api_endpoint")
            if not isinstance(endpoint, str) or not endpoint.startswith("http"):
                raise UpstreamProtocolError("discovery gave no api_endpoint", upstream=UPSTREAM)
            self.api_base_url = endpoint.rstrip("/")
            return self.api_base_url

    async def _get(
        self,
        url: str,
        deadline: Deadline,
        *,
        params: dict[str, str | int],
        token: str | None = None,
    ) -> httpx.Response:
        timeout = deadline.bound(self.timeout_seconds)
        if timeout <= 0:
            raise UpstreamTimeout("no time left for the CXone call", upstream=UPSTREAM)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        sent = tracing.with_trace_headers(headers)  # CXone's spans join the caller's trace
        try:
            if isinstance(self.http, UpstreamClient):  # the service's own client: direct
                return await self.http.get_whole(url, params, sent, timeout)
            return await self.http.get(url, params=params, headers=sent, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("CXone did not answer in time", upstream=UPSTREAM) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"CXone unreachable: {type(exc).__name__}", upstream=UPSTREAM
            ) from exc

    @staticmethod
    def _json_or_raise(response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if status >= 500:
            raise UpstreamUnavailable(f"CXone answered {status}", upstream=UPSTREAM, status=status)
        if status >= 400:
            raise UpstreamRejected(f"CXone answered {status}", upstream=UPSTREAM, status=status)
        try:
            payload = response.json()
        except ValueError as exc:
            raise UpstreamProtocolError("CXone answered non-JSON", upstream=UPSTREAM) from exc
        if not isinstance(payload, dict):
            raise UpstreamProtocolError("CXone answered a non-object", upstream=UPSTREAM)
        return payload


def path_segment(value: str) -> str:
    """A contact id as one URL path segment. It comes from the webhook body (a Cognigy flow may
    name any string), so `?`, `#`, spaces and control characters are percent-encoded; `.`, `..`
    and anything with a slash name no contact and could climb the path (some servers decode
    `%2E` and `%2F` before normalising), so they are refused like an unknown contact."""
    if value in (".", "..") or "/" in value or "\\" in value:
        raise UpstreamRejected(f"{value!r} cannot name a CXone contact", upstream=UPSTREAM)
    return quote(value, safe="")
