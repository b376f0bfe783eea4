"""OpenAI's chat completion wire: the request the official clients send and the `chat.completion`
/ `chat.completion.chunk` / error / model-list shapes they parse.

Every request field the official client can send (its messages and tools: openai_messages)
is passed on, mapped or refused with a 400
that names it, never dropped silently (docs/chat.md's field table says which, per provider kind):
messages of every role (system, developer, user, assistant with `tool_calls`, tool with
`tool_call_id`), content as a string or parts (`text`, `image_url`, `input_audio`), tools,
tool_choice, parallel_tool_calls, response_format, stop, seed, top_p, the penalties,
logit_bias, metadata, store, service_tier, max_completion_tokens (else max_tokens), temperature,
stream and stream_options, user (the session id when no X-Session-Id header), and cx-relay's own
`fallback_models` and `safety_filters`. Refused: n above 1, logprobs and top_logprobs (the
answer passes through cx-relay's guard, which has no token probabilities to give), and the
legacy `functions` / `function_call` (tools / tool_choice say the same).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.llm.types import CHAT_OPTIONS
from app.pipelines.chat_wire import (
    MAX_MESSAGES,
    AnswerFormatted,
    ResponseFormat,
    SafetyFilterName,
)
from app.surfaces.openai.messages import (
    NamedToolChoice,
    OpenAIMessage,
    SessionUser,
    Tool,
    ToolCall,
)

MAX_TOOLS = 128


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


_NO_LOGPROBS = (
    "token log probabilities are not available through cx-relay: its output guard may change "
    "the answer after the model wrote it"
)
_NO_FUNCTIONS = "functions and function_call are deprecated: send tools and tool_choice"
# OpenAI fields a request may carry only empty, and why any other value is refused
_REFUSED_FIELDS = {
    "logprobs": _NO_LOGPROBS,
    "top_logprobs": _NO_LOGPROBS,
    "functions": _NO_FUNCTIONS,
    "function_call": _NO_FUNCTIONS,
}


class ChatCompletionRequest(AnswerFormatted, BaseModel):
    """Fields not modelled here (OpenAI adds some every few months: reasoning_effort, verbosity,
    prompt_cache_key ...) are kept and passed on by name with the options, so a newer client is
    served as OpenAI would serve it (or refused by the provider, quoting it), never ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    user: SessionUser = None
    response_format: ResponseFormat | None = None
    n: int | None = Field(None, json_schema_extra={"enum": [1, None]})
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, int] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=32)
    logprobs: bool | None = Field(None, json_schema_extra={"enum": [False, None]})
    top_logprobs: int | None = Field(None, json_schema_extra={"enum": [None]})
    functions: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: Any = Field(None, json_schema_extra={"enum": [None]})
    fallback_models: list[str] = Field(default_factory=list, max_length=5)  # cx-relay extension
    safety_filters: list[SafetyFilterName] | None = None  # cx-relay extension (as /chat's)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported: send one request per choice")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit() or not -100 <= bias <= 100:
                raise ValueError("logit_bias maps token ids to a bias between -100 and 100")
        return value

    @field_validator(*_REFUSED_FIELDS)
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(_REFUSED_FIELDS[info.field_name or ""])
        return value

    @model_validator(mode="after")
    def _coherent(self) -> ChatCompletionRequest:
        extra = self.model_extra or {}
        if extra.get("audio") is not None or "audio" in (extra.get("modalities") or []):
            raise ValueError(
                "audio answers are not supported: cx-relay's guard and ledger read text"
            )
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages need at least one user message")
        self.check_streamable()
        names = {t.function.name for t in self.tools or []}
        if len(names) < len(self.tools or []):
            raise ValueError("tools: two functions have the same name")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools")
        chosen = self.tool_choice
        if isinstance(chosen, NamedToolChoice) and chosen.function.name not in names:
            raise ValueError(f"tool_choice names {chosen.function.name!r}, which is not a tool")
        called: set[str] = set()
        for message in self.messages:
            called |= {c.id for c in message.tool_calls or []}
            if message.role == "tool" and message.tool_call_id not in called:
                raise ValueError(
                    f"the tool message for {message.tool_call_id!r} answers no earlier tool call"
                )
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def options(self) -> dict[str, Any]:
        """The request fields passed on by name (ChatRequest.options), those the caller set."""
        values = {name: getattr(self, name) for name in CHAT_OPTIONS}
        values.update(self.model_extra or {})
        return {name: value for name, value in values.items() if value is not None}

    def tool_definitions(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def tool_choice_value(self) -> str | dict[str, Any] | None:
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice


# --- responses ----------------------------------------------------------------------------------


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CxRelayExtras(BaseModel):
    """What the gateway did, in a top-level field the OpenAI clients keep but do not read."""

    session_id: str | None  # None: the call named no session (X-Session-Id or `user`)
    cost: float
    cached: bool
    lightweight_mode: bool
    provider: str
    model: str  # the model that answered (a stream's chunks name the one asked for)
    prompt_injection: list[str] = Field(default_factory=list)
    blocked: str | None = None
    dropped_turns: int = 0
    usage_estimated: bool = False
    latency_ms: float = 0.0
    output: dict[str, Any] | None = None  # the validated object, with a json_schema


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None
    cx_relay: CxRelayExtras


class ChunkFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(BaseModel):
    """A piece of a streamed tool call: its id, type and name in the first, arguments after."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta = Field(default_factory=ChunkDelta)
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None
    cx_relay: CxRelayExtras | None = None

    def wire(self) -> dict[str, Any]:
        """OpenAI's chunk: a delta carries only what it sets; usage and extras only when set."""
        body = self.model_dump(mode="json")
        for choice in body["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            for call in choice["delta"].get("tool_calls", []):
                for key in ("id", "type"):
                    if call[key] is None:
                        del call[key]
                call["function"] = {k: v for k, v in call["function"].items() if v is not None}
        for key in ("usage", "cx_relay"):
            if body[key] is None:
                del body[key]
        return body


class ErrorDetail(BaseModel):
    """OpenAI's `error` object; the official clients expose it as the exception's `body`."""

    model_config = ConfigDict(extra="allow")  # cx-relay detail, e.g. the refused budget

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cx-relay"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
