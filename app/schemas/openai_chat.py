"""OpenAI's chat completion wire: the request the official clients send and the `chat.completion`
/ `chat.completion.chunk` / error / model-list shapes they parse.

Every request field the official client can send is passed on, mapped or refused with a 400
that names it, never dropped silently (the README's field table says which, per provider kind):
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

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.schemas.chat import (
    MAX_MESSAGES,
    SESSION_ID_PATTERN,
    TEXT_PARTS_SEPARATOR,
    ResponseFormat,
    SafetyFilterName,
)
from app.services.llm.types import CHAT_OPTIONS, OutputSchema

SESSION_ID_RULE = "1-128 characters: letters, digits and _ . : @ -, starting with a letter or digit"
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOOLS = 128


def valid_session_id(value: str) -> bool:
    return re.fullmatch(SESSION_ID_PATTERN, value) is not None


# --- content parts -------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _fetchable(cls, url: str) -> str:
        if url.startswith(("http://", "https://")):
            return url
        if re.match(r"^data:image/[a-z0-9.+-]+;base64,", url):
            return url
        raise ValueError("an image_url is an http(s) URL or a data:image/...;base64, URL")


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(min_length=1)  # base64
    format: Literal["wav", "mp3"]


class AudioPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


_PARTS: TypeAdapter[list[ContentPart]] = TypeAdapter(list[ContentPart])

def _part_schema(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"type": {"enum": [kind]}, **fields},
        "required": ["type", *fields],
    }


# What `_content` takes, said in the published OpenAPI document (documentation only).
_CONTENT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    _part_schema("text", {"text": {"type": "string"}}),
                    _part_schema(
                        "image_url",
                        {
                            "image_url": {
                                "type": "object",
                                "properties": {
                                    "url": {"type": "string"},
                                    "detail": {"enum": ["auto", "low", "high"]},
                                },
                                "required": ["url"],
                            }
                        },
                    ),
                    _part_schema(
                        "input_audio",
                        {
                            "input_audio": {
                                "type": "object",
                                "properties": {
                                    "data": {"type": "string"},
                                    "format": {"enum": ["wav", "mp3"]},
                                },
                                "required": ["data", "format"],
                            }
                        },
                    ),
                ]
            },
        },
        {"type": "null"},
    ]
}


def _content(value: Any) -> Any:
    """A string, None, or the parts validated here, so that a bad part is one error at
    `messages[i].content` saying which part and why (a part of a type cx-relay cannot forward,
    such as a file, is named)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("content is a string or a list of parts")
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image_url", "input_audio"):
            raise ValueError(
                f"content part type {kind!r} is not supported (text, image_url, input_audio)"
            )
    try:
        return _PARTS.validate_python(value)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        loc = list(first["loc"])
        if len(loc) > 1 and isinstance(loc[0], int):
            del loc[1]  # the discriminator's tag: the part's own type, said twice otherwise
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"part{where}: {message}") from None


Content = Annotated[
    str | list[ContentPart] | None, BeforeValidator(_content), WithJsonSchema(_CONTENT_SCHEMA)
]


# --- messages and tools --------------------------------------------------------------------------


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


class OpenAIMessage(BaseModel):
    """One message; `refusal`, `audio` and other fields a client echoes back are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("role", mode="before")
    @classmethod
    def _legacy_role(cls, role: Any) -> Any:
        if role == "function":
            raise ValueError('the legacy "function" role: send a "tool" message with tool_call_id')
        return role

    @model_validator(mode="after")
    def _shape(self) -> OpenAIMessage:
        if isinstance(self.content, list) and not self.content:
            raise ValueError("content is an empty list")
        has_words = bool(self.text.strip()) or self.media
        if self.role == "assistant":
            if not has_words and not self.tool_calls:
                raise ValueError("an assistant message needs content or tool_calls")
        elif self.tool_calls:
            raise ValueError("only an assistant message carries tool_calls")
        elif self.role == "tool":
            if self.tool_call_id is None:
                raise ValueError("a tool message needs the tool_call_id it answers")
            if self.media:
                raise ValueError("a tool message's content is text")
        elif not has_words:
            raise ValueError("message content is empty")
        if self.media and self.role != "user":
            raise ValueError("image and audio parts go in user messages")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return TEXT_PARTS_SEPARATOR.join(
            p.text for p in self.content or [] if isinstance(p, TextPart)
        )

    @property
    def media(self) -> bool:
        return isinstance(self.content, list) and any(
            not isinstance(p, TextPart) for p in self.content
        )

    def wire(self) -> dict[str, Any]:
        """The message as the pipeline and the providers take it: text parts alone become one
        string (so every later step treats them as that string), media parts stay parts."""
        message: dict[str, Any] = {"role": self.role}
        if isinstance(self.content, list) and self.media:
            message["content"] = [p.model_dump(exclude_none=True) for p in self.content]
        elif self.content is not None:
            message["content"] = self.text
        elif self.role == "assistant":
            message["content"] = None
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
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
    user: str | None = Field(None, json_schema_extra={"pattern": SESSION_ID_PATTERN})
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

    @field_validator("user")
    @classmethod
    def _user_is_session(cls, value: str | None) -> str | None:
        if value is not None and not valid_session_id(value):
            raise ValueError(f"user is used as the session id: {SESSION_ID_RULE}")
        return value

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

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise ValueError(
                "token log probabilities are not available through cx-relay: its output guard "
                "may change the answer after the model wrote it"
            )
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, value: Any) -> Any:
        if value:
            raise ValueError(
                "functions and function_call are deprecated: send tools and tool_choice"
            )
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
        if self.stream and self.json_schema is not None:
            raise ValueError(
                "a response_format json_schema answer is validated whole: it cannot be streamed"
            )
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
    def json_schema(self) -> dict[str, Any] | None:
        return self.response_format.answer_schema if self.response_format else None

    @property
    def output_schema(self) -> OutputSchema | None:
        return self.response_format.output_schema() if self.response_format else None

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
