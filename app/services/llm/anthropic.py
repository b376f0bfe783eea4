"""One request to Anthropic's Messages API (`/v1/messages`), mapped to the same typed errors.

Anthropic differs from the OpenAI wire in ways the pipeline must not see: the system prompt is a
top-level field, turns must alternate user/assistant starting with a user turn, `max_tokens` is
mandatory, there is no `response_format`, and overload is its own status (529). This module hides
those differences behind the `ProviderClient` protocol; retries and fallbacks stay in the router.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from app.errors import (
    UpstreamProtocolError,
)
from app.services.llm.types import ChatRequest, ChatResult, Usage
from app.services.llm.wire import post_json, probe_key, raise_for_status

ANTHROPIC_VERSION = "2023-06-01"

JSON_INSTRUCTION = (
    "Respond with exactly one JSON object and nothing else: no prose, no code fences, "
    "no text before or after it."
)

# Anthropic rejects a conversation that starts with an assistant turn (or has no turn at all).
LEADING_USER_TURN = "(start of conversation)"

_SYSTEM_ROLES = frozenset({"system", "developer"})


def messages_url(base_url: str) -> str:
    """`https://host` and `https://host/v1` both mean `https://host/v1/messages`."""
    base = base_url.rstrip("/")
    if base.endswith("/v1/messages"):
        return base
    return base + ("/messages" if base.endswith("/v1") else "/v1/messages")


def anthropic_headers(api_key: str | None, auth_header: str | None) -> dict[str, str]:
    """`x-api-key` by default; a gateway's own header carries the bare key (Authorization: Bearer).

    The version header is always sent: Anthropic refuses requests without it.
    """
    headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
    if not api_key:
        return headers
    if auth_header is None:
        headers["x-api-key"] = api_key
    elif auth_header.lower() == "authorization":
        headers["Authorization"] = f"Bearer {api_key}"  # a bare key there is never valid HTTP auth
    else:
        headers[auth_header] = api_key
    return headers


def split_messages(
    messages: list[dict[str, str]],
) -> tuple[str | None, list[dict[str, str]]]:
    """OpenAI-style turns to Anthropic's `(system, messages)`.

    System turns are lifted out and joined with blank lines; the remaining turns are made to
    alternate (consecutive same-role turns merged) and to start with a user turn, since Anthropic
    answers 400 otherwise. Empty turns are dropped for the same reason.
    """
    system_parts: list[str] = []
    turns: list[dict[str, str]] = []
    for message in messages:
        role = str(message.get("role", "user"))
        content = str(message.get("content") or "")
        if role in _SYSTEM_ROLES:
            if content.strip():
                system_parts.append(content)
            continue
        if not content.strip():
            continue
        role = "assistant" if role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n\n" + content}
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": LEADING_USER_TURN})
    if turns[-1]["role"] == "assistant":
        # A final assistant turn is a prefill, and Anthropic refuses one ending in whitespace.
        turns[-1] = {"role": "assistant", "content": turns[-1]["content"].rstrip()}
    return ("\n\n".join(system_parts) or None), turns


class AnthropicProvider:
    """A provider reached over Anthropic's Messages API (api.anthropic.com or a gateway)."""

    kind = "anthropic"

    def __init__(self, name: str, base_url: str, auth_header: str | None = None) -> None:
        self.name = name
        self.url = messages_url(base_url)
        self.models_url = self.url.removesuffix("/messages") + "/models"
        self._auth_header = auth_header

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        system, turns = split_messages(request.messages)
        if request.json_output:
            # No response_format on this wire: the instruction is the only lever.
            system = f"{system}\n\n{JSON_INSTRUCTION}" if system else JSON_INSTRUCTION
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            # Anthropic accepts 0..1 where OpenAI accepts 0..2: clamp rather than get a 400.
            "temperature": min(max(request.temperature, 0.0), 1.0),
            "messages": turns,
        }
        if system:
            body["system"] = system
        body.update(request.extra)
        return body

    async def complete(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> ChatResult:
        started = time.perf_counter()
        headers = anthropic_headers(api_key, self._auth_header)
        response = await post_json(
            http, self.name, self.url, self.payload(request), headers, timeout
        )
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code >= 400:
            error_type, detail = _error_detail(response, api_key)
            raise_for_status(
                self.name,
                response,
                detail,
                context_length=_is_prompt_too_long(error_type, detail),
            )
        return self._result(response, request, latency_ms)

    async def probe(self, http: httpx.AsyncClient, api_key: str | None, timeout: float) -> bool:
        return await probe_key(
            http, self.models_url, anthropic_headers(api_key, self._auth_header), timeout
        )

    def _result(
        self, response: httpx.Response, request: ChatRequest, latency_ms: float
    ) -> ChatResult:
        try:
            body = response.json()
            blocks = body["content"]
            if not isinstance(blocks, list):
                raise TypeError("content is not a list")
            content = "".join(
                str(block.get("text") or "")
                for block in blocks
                if isinstance(block, dict) and block.get("type") == "text"
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamProtocolError(
                f"{self.name} answered 2xx without a Messages API message", upstream=self.name
            ) from exc
        usage = body.get("usage") or {}
        try:
            parsed_usage = Usage(
                int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise UpstreamProtocolError(
                f"{self.name} answered 2xx with malformed usage", upstream=self.name
            ) from exc
        return ChatResult(
            content=content,
            model=str(body.get("model") or request.model),
            provider=self.name,
            usage=parsed_usage,
            latency_ms=latency_ms,
        )


def _is_prompt_too_long(error_type: str | None, detail: str) -> bool:
    return error_type in (None, "invalid_request_error") and "prompt is too long" in detail.lower()


def _error_detail(response: httpx.Response, api_key: str | None) -> tuple[str | None, str]:
    """Anthropic's `{"type": "error", "error": {"type", "message"}}`, else the reason phrase.

    Only the provider's own message is quoted, truncated, and with the key redacted in case a
    gateway echoes the key it refused: error messages end up in logs and answers.
    """
    fallback = response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        return None, fallback
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, fallback
    error_type = error.get("type")
    message = str(error.get("message") or "")
    if api_key:
        message = message.replace(api_key, "[redacted]")
    return (str(error_type) if error_type else None), (message[:200] or fallback)
