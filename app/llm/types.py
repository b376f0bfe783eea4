"""What the pipeline asks of an LLM and what it gets back, independent of any provider's wire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

from app.llm.messages import Message


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class OutputSchema:
    """The JSON Schema a caller wants the answer to match. It goes to the model on the first
    call (OpenAI's `json_schema` response format where the provider takes it, else the system
    instruction), so a structured answer does not wait for the repair prompt to see it.

    `strict` is OpenAI's strict mode, passed as the caller gave it: off unless asked for, since
    strict mode refuses (400) any schema outside its subset. `name` is the response format's
    label (OpenAI requires one)."""

    schema: dict[str, Any]
    name: str = "response"
    strict: bool = False
    description: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A chat call in OpenAI's terms (messages: app.llm.messages); each wire sends it
    as its provider takes it."""

    messages: list[Message]
    model: str
    temperature: float
    max_tokens: int
    json_output: bool = False  # one JSON object (OpenAI's json_object), schema or not
    output_schema: OutputSchema | None = None  # the object's JSON Schema, when the caller has one
    tools: list[dict[str, Any]] | None = None  # OpenAI's [{type: function, function: {...}}]
    tool_choice: str | dict[str, Any] | None = None  # "auto", "none", "required" or a function
    parallel_tool_calls: bool | None = None
    # OpenAI's other request fields, by their names (stop, seed, top_p, penalties, logit_bias,
    # metadata, store, service_tier): passed on, or mapped, by each wire (CHAT_OPTIONS below)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BrokenPart:
    """The text a provider streamed to the caller before its stream broke, which the route's
    next entry continued: that provider bills the prompt it was sent and this text."""

    provider: str
    model: str
    prompt: list[Message]
    text: str


@dataclass(frozen=True)
class ChatResult:
    content: str
    model: str
    provider: str
    usage: Usage
    latency_ms: float
    attempts: int = 1
    trail: tuple[Any, ...] = ()  # attempts.Attempt records, oldest first
    usage_reported: bool = True  # False: a stream ended without a usage chunk (usage is 0/0)
    ttft_ms: float | None = None  # streamed answers: time to the first content delta
    finish_reason: str | None = None  # OpenAI's: "stop", "length", "tool_calls", ...
    broken: tuple[BrokenPart, ...] = ()  # streams that broke before this one continued them
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI's [{id, type, function: {name, args}}]


class ProviderClient(Protocol):
    """One provider's wire format: a single attempt with a given key, and a cheap key probe.

    Implementations raise the typed errors of app.core.errors (UpstreamRateLimited with retry_after,
    UpstreamRejected with status 401/403 for a bad key, ContextLengthExceeded, UpstreamUnavailable,
    UpstreamTimeout, UpstreamProtocolError); retries, key rotation and fallbacks are the router's.
    """

    name: str
    kind: str

    async def complete(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> ChatResult: ...

    async def probe(self, http: httpx.AsyncClient, api_key: str | None, timeout: float) -> bool: ...


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call: the call at `index`, its id and name when it starts,
    then fragments of its JSON arguments (OpenAI's `delta.tool_calls[]`)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class StreamChunk:
    """One piece of a streamed answer: a content delta, tool call pieces, and/or the usage,
    model or finish reason the provider reported with it (usage usually arrives alone last)."""

    delta: str = ""
    usage: Usage | None = None
    model: str | None = None
    finish_reason: str | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


@runtime_checkable
class StreamingProviderClient(ProviderClient, Protocol):
    """A provider that can also stream one attempt.

    `stream` is an async generator: it yields StreamChunks as they arrive and raises the same
    typed errors as `complete` (an error status before the first event included). A stream that
    ends before the provider's end marker raises UpstreamUnavailable ("stream cut"): a cut answer
    never looks complete. `timeout` bounds each network operation (connect, each read); the
    whole answer is bounded by the consumer (`streaming.collect_stream`). Consumers must close
    the generator (`aclose`) when they stop early so the connection is released.

    Runtime-checkable: `isinstance(client, StreamingProviderClient)` tells whether a client has
    a `stream` method (attribute presence only, as for every runtime protocol).
    """

    def stream(
        self, http: httpx.AsyncClient, request: ChatRequest, timeout: float, api_key: str | None
    ) -> AsyncIterator[StreamChunk]: ...


# OpenAI's request fields beside messages, model, temperature and max tokens that a caller may
# send and cx-relay passes on (ChatRequest.options): what each provider kind does with them is
# the wire's (the Anthropic wire maps stop and top_p, and cannot take the others).
CHAT_OPTIONS = (
    "stop",
    "seed",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "metadata",
    "store",
    "service_tier",
)
