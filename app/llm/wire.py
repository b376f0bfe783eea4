"""What every provider's wire has in common: sending with transport errors mapped to typed
errors, probing a key, and mapping an error status to the error the router acts on."""

from __future__ import annotations

import email.utils
import json
import re
import time
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from app.core.errors import (
    ContextLengthExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.llm.messages import SYSTEM_ROLES, Message, message_text
from app.llm.types import OutputSchema
from app.observability.tracing import with_trace_headers
from app.safety.rules import SafetyRules
from app.upstream.http_client import UpstreamClient

_DELAY_SECONDS = re.compile(r"\d+(\.\d+)?")

JSON_INSTRUCTION = (
    "Respond with exactly one JSON object and nothing else: no prose, no code fences, "
    "no text before or after it."
)

# OpenAI's rule for a response format's name; anything else in a caller's name becomes "_".
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")


def json_instruction(output_schema: OutputSchema | None) -> str:
    """What a provider without a schema-aware response format is told: one JSON object, and the
    caller's schema when there is one (compact, so it costs few prompt tokens)."""
    if output_schema is None:
        return JSON_INSTRUCTION
    text = JSON_INSTRUCTION + " The object must match this JSON Schema"
    if output_schema.description:
        text += f" ({output_schema.description})"
    return text + ":\n" + json.dumps(output_schema.schema, separators=(",", ":"))


def with_system_text(messages: list[Message], text: str) -> list[Message]:
    """`text` added to the leading system message (one leads when there is none): some models'
    chat templates refuse a second system message, or one that is not first."""
    if messages and messages[0].get("role") in SYSTEM_ROLES:
        first = messages[0]
        return [{**first, "content": f"{message_text(first)}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def json_schema_format(output_schema: OutputSchema) -> dict[str, Any]:
    """OpenAI's `response_format` for a schema: `{"type": "json_schema", "json_schema": {name,
    schema, strict[, description]}}`, the name made one OpenAI accepts."""
    spec: dict[str, Any] = {
        "name": _NOT_IN_NAME.sub("_", output_schema.name)[:64] or "response",
        "schema": output_schema.schema,
        "strict": output_schema.strict,
    }
    if output_schema.description:
        spec["description"] = output_schema.description
    return {"type": "json_schema", "json_schema": spec}


def v1_url(base_url: str, resource: str) -> str:
    """`https://host` and `https://host/v1` both mean `https://host/v1/<resource>`; a base that
    already names the resource is kept as it is."""
    base = base_url.rstrip("/")
    if base.endswith(f"/{resource}"):
        return base
    return base + (f"/{resource}" if base.endswith("/v1") else f"/v1/{resource}")


def shown_url(url: str) -> str:
    """A provider's URL as logs and /health show it: without credentials or a query, which some
    operators put in a URL (and /health is served without authentication)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


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


async def post_json(
    http: httpx.AsyncClient,
    provider: str,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    timeout: float,
) -> httpx.Response:
    sent = with_trace_headers(headers)  # the attempt's span is the provider's parent
    try:
        if isinstance(http, UpstreamClient):  # the service's own client: its direct path
            return await http.post_json(url, body, sent, timeout)
        return await http.post(url, json=body, headers=sent, timeout=timeout)
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(
            f"{provider} did not answer within {timeout:.2f}s", upstream=provider
        ) from exc
    except httpx.HTTPError as exc:
        raise UpstreamUnavailable(
            f"{provider} unreachable: {type(exc).__name__}",
            upstream=provider,
            detail=transport_failure(exc),
        ) from exc


def stream_json(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], timeout: float
) -> AbstractAsyncContextManager[httpx.Response]:
    """A streamed POST: on the service's own client, its direct path (as `post_json`)."""
    sent = with_trace_headers(headers)
    if isinstance(http, UpstreamClient):
        return http.stream_json(url, body, sent, timeout)
    return http.stream("POST", url, json=body, headers=sent, timeout=timeout)


def transport_failure(exc: BaseException) -> str:
    """What a transport error says (`Cannot connect to host …`), for the operator: the class
    alone does not tell a refused connection from a name that does not resolve."""
    return str(exc).strip()[:300]


async def probe_key(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], timeout: float
) -> bool:
    """Does this key work? A `GET /v1/models` costs no tokens. Only a model list counts (OpenAI's
    and Anthropic's `{"data": [...]}`): a 200 with anything else (a login page, a proxy's or a
    catch-all server's answer) is not a provider taking the key."""
    try:
        response = await http.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    try:
        listed = response.json()
    except ValueError:  # not JSON (or not UTF-8)
        return False
    return isinstance(listed, dict) and isinstance(listed.get("data"), list)


_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+\S+")
# The shipped PII patterns, loaded once at import (start-up), never per request.
_PII = SafetyRules.load()


def quote_provider_message(message: str, api_key: str | None, limit: int = 200) -> str:
    """A provider's own error message, safe to log and to pass on to our caller: some gateways
    echo the credential they refused, so the key and any `Bearer ...` value are redacted; some
    quote the request, so the customer's PII (cards, emails, SSNs ...) is redacted too."""
    if api_key:
        message = message.replace(api_key, "[redacted]")
    message = _BEARER.sub(lambda m: f"{m.group(1)} [redacted]", message)
    return _PII.redact(message).text[:limit]


def raise_for_status(
    provider: str, response: httpx.Response, detail: str, *, context_length: bool
) -> None:
    """Nothing for a success; else the typed error: the router retries, rotates keys or falls
    back on what it is, never on the status number."""
    status = response.status_code
    if status < 400:
        return
    if status == 400 and context_length:
        raise ContextLengthExceeded(
            f"{provider}: prompt exceeds the model's context window: {detail}",
            upstream=provider,
            status=status,
        )
    if status == 429:
        raise UpstreamRateLimited(
            f"{provider} rate-limited the request: {detail}",
            upstream=provider,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    if status >= 500 or status == 408:  # includes Anthropic's 529 "overloaded"
        raise UpstreamUnavailable(
            f"{provider} answered {status}: {detail}", upstream=provider, status=status
        )
    raise UpstreamRejected(
        f"{provider} refused the request ({status}): {detail}", upstream=provider, status=status
    )
