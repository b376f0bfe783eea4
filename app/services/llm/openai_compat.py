"""One request to an OpenAI-compatible `/v1/chat/completions`, mapped to typed errors.

This module makes exactly one attempt; retries, backoff and deadlines live in `retry.py`, so the
same attempt can later be driven by provider routing and fallback chains.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any

import httpx

from app.errors import (
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.services.llm.types import ChatRequest, ChatResult, Usage


def chat_completions_url(base_url: str) -> str:
    """`https://host` and `https://host/v1` both mean `https://host/v1/chat/completions`."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


_DELAY_SECONDS = re.compile(r"\d+(\.\d+)?")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class OpenAICompatibleProvider:
    """A provider reached over the OpenAI chat completions wire format."""

    def __init__(self, name: str, base_url: str, api_key: str | None) -> None:
        self.name = name
        self.url = chat_completions_url(base_url)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

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
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float
    ) -> ChatResult:
        started = time.perf_counter()
        try:
            response = await http.post(
                self.url, json=self.payload(request), headers=self._headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(
                f"{self.name} did not answer within {timeout:.2f}s", upstream=self.name
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"{self.name} unreachable: {type(exc).__name__}", upstream=self.name
            ) from exc
        latency_ms = (time.perf_counter() - started) * 1000
        self._raise_for_status(response)
        return self._result(response, request, latency_ms)

    def _raise_for_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        detail = _error_message(response)
        if status == 429:
            raise UpstreamRateLimited(
                f"{self.name} rate-limited the request: {detail}",
                upstream=self.name,
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if status >= 500 or status == 408:
            raise UpstreamUnavailable(
                f"{self.name} answered {status}: {detail}", upstream=self.name, status=status
            )
        raise UpstreamRejected(
            f"{self.name} refused the request ({status}): {detail}",
            upstream=self.name,
            status=status,
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


def _error_message(response: httpx.Response) -> str:
    """The provider's own error message when it sends OpenAI's error shape (never a key)."""
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    return str(message)[:200] if message else response.reason_phrase or "error"
