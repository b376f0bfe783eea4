"""OpenAI's chat completion wire: the request the official clients send and the `chat.completion`
/ `chat.completion.chunk` / error / model-list shapes they parse.

Honoured request fields: model, messages (system/user/assistant; string content or text parts),
stream, stream_options.include_usage, max_completion_tokens (else max_tokens), temperature, user
(the session id when no X-Session-Id header), response_format (text, json_object, json_schema),
n (1 only) and cx-relay's own `fallback_models`. Anything else (top_p, penalties, seed, stop,
logprobs, metadata, ...) is accepted and ignored, since the clients send many; `tools` and
`functions` are refused, as ignoring them would silently change what the caller gets.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.schemas.chat import MAX_MESSAGES, SESSION_ID_PATTERN, MessageText, ResponseFormat
from app.services.llm.types import OutputSchema

SESSION_ID_RULE = "1-128 characters: letters, digits and _ . : @ -, starting with a letter or digit"


def valid_session_id(value: str) -> bool:
    return re.fullmatch(SESSION_ID_PATTERN, value) is not None


class OpenAIMessage(BaseModel):
    """One message; `name`, `refusal` and other fields a client echoes back are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: MessageText


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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
    tools: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    functions: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    fallback_models: list[str] = Field(default_factory=list, max_length=5)  # cx-relay extension

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
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool and function calling are not supported")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> ChatCompletionRequest:
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages need at least one user message")
        if self.stream and self.json_schema is not None:
            raise ValueError(
                "a response_format json_schema answer is validated whole: it cannot be streamed"
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
    content: str
    refusal: str | None = None


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


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


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
