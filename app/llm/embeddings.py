"""OpenAI's embeddings wire, `POST /v1/embeddings`: what one attempt sends and what it reads back.

Every OpenAI-compatible provider speaks it over HTTP, whatever its chat transport (an Anthropic
provider has none: the provider file refuses an embedding model there). The request carries
`dimensions` and `encoding_format` on to the provider; the answer's vectors are kept as it sent
them, floats or OpenAI's base64 (little-endian float32), after checking that there is one well-
formed vector per input. `in_format` turns one form into the other for a provider that ignored
the format asked for. Retries, key rotation and fallback are the router's (`LLMRouter.embed`).
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import httpx

from app.core.errors import UpstreamProtocolError, UpstreamRejected
from app.llm.types import ChatResult, Usage

EncodingFormat = Literal["float", "base64"]
Vector = list[float] | str  # floats, or base64 of little-endian float32
Input = str | tuple[int, ...]  # a text, or its token ids


@dataclass(frozen=True)
class EmbeddingRequest:
    """One embeddings call: `inputs` are texts or token-id lists (never both), one vector each."""

    model: str
    inputs: tuple[Input, ...]
    dimensions: int | None = None
    encoding_format: EncodingFormat = "float"


@dataclass(frozen=True)
class EmbeddingResult(ChatResult):
    """An embeddings answer. It is a ChatResult (no content) so the router walks a route for it
    exactly as for a chat answer: usage, provider, model, latency and the attempts' trail; the
    vectors are in input order."""

    vectors: tuple[Vector, ...] = ()


@runtime_checkable
class EmbeddingProviderClient(Protocol):
    """A provider client that also answers embeddings (one attempt, the typed errors of
    app.core.errors, like `ProviderClient.complete`)."""

    name: str

    async def embed(
        self,
        http: httpx.AsyncClient,
        request: EmbeddingRequest,
        timeout: float,
        api_key: str | None,
    ) -> EmbeddingResult: ...


def embedding_client(client: object) -> EmbeddingProviderClient:
    """`client` as one that answers embeddings; an UpstreamRejected (404) when it has no
    embeddings endpoint (the provider file refuses such a route, so this is a safety net)."""
    if not isinstance(client, EmbeddingProviderClient):
        name = str(getattr(client, "name", "provider"))
        raise UpstreamRejected(f"{name} has no embeddings endpoint", upstream=name, status=404)
    return client


def embeddings_payload(request: EmbeddingRequest) -> dict[str, Any]:
    """The request body: the inputs as a list (one text, or one token list, is a list of one)."""
    body: dict[str, Any] = {
        "model": request.model,
        "input": [item if isinstance(item, str) else list(item) for item in request.inputs],
        "encoding_format": request.encoding_format,
    }
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return body


def parse_embeddings(
    provider: str, response: httpx.Response, request: EmbeddingRequest, latency_ms: float
) -> EmbeddingResult:
    """A 2xx answer as an EmbeddingResult; UpstreamProtocolError when it is not one vector per
    input (a list of numbers, or base64 of float32s)."""
    try:
        body = response.json()
        data = body["data"]
        if not isinstance(data, list) or len(data) != len(request.inputs):
            raise ValueError("not one embedding per input")
        at = {int(item.get("index", n)): item["embedding"] for n, item in enumerate(data)}
        vectors = tuple(_vector(at[n]) for n in range(len(data)))
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise UpstreamProtocolError(
            f"{provider} answered 2xx without one embedding per input", upstream=provider
        ) from exc
    usage = body.get("usage")
    reported = isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int)
    return EmbeddingResult(
        content="",
        model=str(body.get("model") or request.model),
        provider=provider,
        usage=Usage(int(usage["prompt_tokens"]) if reported else 0, 0),
        latency_ms=latency_ms,
        usage_reported=reported,
        vectors=vectors,
    )


def _vector(value: Any) -> Vector:
    if isinstance(value, str):
        if len(base64.b64decode(value, validate=True)) % 4:
            raise ValueError("base64 embedding is not whole float32s")
        return value
    if not isinstance(value, list) or not all(type(x) in (float, int) for x in value):
        raise TypeError("an embedding is a list of numbers or a base64 string")
    return value


def in_format(vector: Vector, encoding_format: EncodingFormat) -> Vector:
    """`vector` as the caller asked for it: OpenAI's base64 is the float32 bytes, little-endian."""
    if encoding_format == "base64":
        if isinstance(vector, str):
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    if isinstance(vector, list):
        return vector
    raw = base64.b64decode(vector)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
