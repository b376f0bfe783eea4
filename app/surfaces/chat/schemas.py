"""The /chat request and response: the tutorial's shape, plus the templated, structured form of
an inference request (template + variables, response_format with a JSON Schema, fallback_models,
safety_filters)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from app.llm.types import OutputSchema
from app.pipelines.chat_wire import (
    MAX_MESSAGES,
    SESSION_ID_PATTERN,
    TEXT_PARTS_SEPARATOR,
    AnswerFormatted,
    ResponseFormat,
    SafetyFilterName,
)

# What the validators below also refuse, said in the published JSON Schema (documentation only).
NOT_BLANK: dict[str, Any] = {"pattern": r"\S"}
_CONTENT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", **NOT_BLANK},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                "required": ["type", "text"],
            },
        },
    ]
}


def message_text(value: object) -> str:
    """A message's content as the one string every later step sees: OpenAI's text parts joined
    with newlines, so the injection check, the token counts, the intent cache, the output guard
    and the provider treat them exactly as that string (a newline, not nothing, so that words of
    two parts never run together and a phrase split across parts is still one phrase). Images,
    audio and files cannot be forwarded: a part of another type is refused, named."""
    if isinstance(value, list):
        texts: list[str] = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"only text content parts are supported, got type {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string `text`")
            texts.append(part["text"])
        value = TEXT_PARTS_SEPARATOR.join(texts)
    if not isinstance(value, str):
        raise ValueError("content must be a string or a list of text parts")
    if not value.strip():
        raise ValueError("message content is empty")
    return value


# A string, or a list of {"type": "text", "text": ...} parts (joined by `message_text`).
MessageText = Annotated[str, BeforeValidator(message_text), WithJsonSchema(_CONTENT_SCHEMA)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: MessageText


class ChatResponseFormat(ResponseFormat):
    """/chat's response_format: OpenAI's shape, or the gateway tutorial's flat one with the
    schema directly under it, `{"type": "json_schema", "schema": {...}}` (and, optionally, the
    `name` and `strict` that OpenAI's shape puts beside its schema)."""

    model_config = ConfigDict(populate_by_name=True)

    schema_: dict[str, Any] | None = Field(None, alias="schema")
    name: str | None = Field(None, min_length=1, max_length=64)
    strict: bool | None = None

    needs_schema: ClassVar[str] = (
        'response_format type "json_schema" needs a schema: json_schema.schema, or schema'
    )

    @model_validator(mode="after")
    def _one_schema(self) -> ChatResponseFormat:
        if self.schema_ is not None and self.json_schema is not None:
            raise ValueError("send the schema once: schema or json_schema.schema, not both")
        if self.schema_ is not None and self.type != "json_schema":
            raise ValueError('a schema is only used with response_format type "json_schema"')
        if (self.name is not None or self.strict is not None) and self.schema_ is None:
            raise ValueError("name and strict go beside a flat schema; with json_schema, inside it")
        return self

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        if self.type == "json_schema" and self.schema_ is not None:
            return self.schema_
        return super().answer_schema

    def output_schema(self) -> OutputSchema | None:
        if self.type == "json_schema" and self.schema_ is not None:
            return OutputSchema(self.schema_, self.name or "response", bool(self.strict))
        return super().output_schema()


# The gateway tutorial's camelCase names, accepted for the snake_case fields (the name first in
# each choice is the documented one).
TUTORIAL_NAMES = {
    "session_id": "sessionId",
    "model": "modelId",
    "stream": "streaming",
    "fallback_models": "fallbackModels",
    "safety_filters": "safetyFilters",
    "response_format": "responseFormat",
}


def _either(name: str) -> AliasChoices:
    return AliasChoices(name, TUTORIAL_NAMES[name])


class ChatBody(AnswerFormatted, BaseModel):
    """One model for both spellings: each field takes its snake_case name or the tutorial's
    camelCase one (never both in one body)."""

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(pattern=SESSION_ID_PATTERN, validation_alias=_either("session_id"))
    messages: list[ChatMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)
    model: str | None = Field(None, min_length=1, max_length=200, validation_alias=_either("model"))
    stream: bool = Field(False, validation_alias=_either("stream"))
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    template: str | None = Field(None, min_length=1)
    variables: dict[str, Any] = Field(default_factory=dict)
    response_format: ChatResponseFormat | None = Field(
        None, validation_alias=_either("response_format")
    )
    fallback_models: list[str] = Field(
        default_factory=list, max_length=5, validation_alias=_either("fallback_models")
    )
    safety_filters: list[SafetyFilterName] | None = Field(
        None, validation_alias=_either("safety_filters")
    )

    @model_validator(mode="before")
    @classmethod
    def _one_name_per_field(cls, data: Any) -> Any:
        if isinstance(data, dict):
            both = [f"{a} and {b}" for a, b in TUTORIAL_NAMES.items() if a in data and b in data]
            if both:
                raise ValueError(
                    f"{'; '.join(both)} name the same field: send each field under one name"
                )
        return data

    @model_validator(mode="after")
    def _coherent(self) -> ChatBody:
        if not self.messages and self.template is None:
            raise ValueError("send messages, or a template to render as the user's message")
        if self.template is None and not any(m.role == "user" for m in self.messages):
            raise ValueError("messages need at least one user message")
        if self.variables and self.template is None:
            raise ValueError("variables are only used with a template")
        # stream with a json_schema: the text streams, the last event carries the check's result
        return self


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatReply(BaseModel):
    """The tutorial's fields first; the rest says what the service did."""

    session_id: str
    response: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    lightweight_mode: bool
    cached: bool
    model: str
    provider: str
    finish_reason: str
    output: dict[str, Any] | None = None
    dropped_turns: int = 0
    prompt_injection: list[str] = Field(default_factory=list)
    blocked: str | None = None
    usage_estimated: bool = False
    latency_ms: float = 0.0  # the whole call, as the service saw it
    # the configured model that answered (after any fallback); `model` is the provider's own name
    model_used: str = ""
