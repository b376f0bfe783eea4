"""One request to an OpenAI-compatible `/v1/chat/completions`, mapped to typed errors.

This module makes exactly one attempt; retries, backoff and deadlines live in `retry.py`, so the
same attempt can later be driven by provider routing and fallback chains.
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


def chat_completions_url(base_url: str) -> str:
    """`https://host` and `https://host/v1` both mean `https://host/v1/chat/completions`."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def auth_headers(
    api_key: str | None, auth_header: str | None, scheme: str = "Bearer"
) -> dict[str, str]:
    """`Authorization: Bearer <key>` by default; a gateway's own header carries the bare key."""
    if not api_key:
        return {}
    if auth_header is None or auth_header.lower() == "authorization":
        return {"Authorization": f"{scheme} {api_key}"}
    return {auth_header: api_key}


class OpenAICompatibleProvider:
    """A provider reached over the OpenAI chat completions wire format (OpenAI, Azure OpenAI v1,
    vLLM, LiteLLM and most gateways)."""

    kind = "openai"

    def __init__(self, name: str, base_url: str, auth_header: str | None = None) -> None:
        self.name = name
        self.url = chat_completions_url(base_url)
        self.models_url = self.url.removesuffix("/chat/completions") + "/models"
        self._auth_header = auth_header

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if request.json_output:
            body["response_format"] = {"type": "json_object"}
        body.update(request.extra)
        return body

    async def complete(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> ChatResult:
        started = time.perf_counter()
        headers = auth_headers(api_key, self._auth_header)
        response = await post_json(
            http, self.name, self.url, self.payload(request), headers, timeout
        )
        latency_ms = (time.perf_counter() - started) * 1000
        detail = _error_message(response)
        raise_for_status(
            self.name, response, detail, context_length=_is_context_length_error(response, detail)
        )
        return self._result(response, request, latency_ms)

    async def probe(self, http: httpx.AsyncClient, api_key: str | None, timeout: float) -> bool:
        return await probe_key(
            http, self.models_url, auth_headers(api_key, self._auth_header), timeout
        )

    def _result(
        self, response: httpx.Response, request: ChatRequest, latency_ms: float
    ) -> ChatResult:
        try:
            body = response.json()
            choice = body["choices"][0]
            content = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UpstreamProtocolError(
                f"{self.name} answered 2xx without a chat completion", upstream=self.name
            ) from exc
        usage = body.get("usage") or {}
        return ChatResult(
            content=content,
            model=str(body.get("model") or request.model),
            provider=self.name,
            usage=Usage(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            ),
            latency_ms=latency_ms,
        )


def _is_context_length_error(response: httpx.Response, detail: str) -> bool:
    try:
        body = response.json()
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    except ValueError:
        code = None
    return code == "context_length_exceeded" or "maximum context length" in detail.lower()


def _error_message(response: httpx.Response) -> str:
    """The provider's own error message when it sends OpenAI's error shape (never a key)."""
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    return str(message)[:200] if message else response.reason_phrase or "error"
