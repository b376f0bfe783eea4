"""The /chat request and response: the tutorial's shape, plus the templated, structured form of
an inference request (template + variables, response_format with a JSON Schema, fallback_models,
safety_filters)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.services.validation import check_json_schema

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
MAX_MESSAGES = 500


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message content is empty")
        return value


class JsonSchemaFormat(BaseModel):
    """OpenAI's `json_schema` response format: a name and the schema the answer must match."""

    name: str = Field("response", min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None

    model_config = ConfigDict(populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(value)
        return value


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format type "json_schema" needs json_schema.schema')
        return self

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the answer must match, when the type asks for one."""
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    messages: list[ChatMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)
    model: str | None = Field(None, min_length=1, max_length=200)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    template: str | None = Field(None, min_length=1)
    variables: dict[str, Any] = Field(default_factory=dict)
    response_format: ResponseFormat | None = None
    fallback_models: list[str] = Field(default_factory=list, max_length=5)
    safety_filters: list[Literal["pii", "unsafe", "injection"]] | None = None

    @model_validator(mode="after")
    def _coherent(self) -> ChatBody:
        if not self.messages and self.template is None:
            raise ValueError("send messages, or a template to render as the user's message")
        if self.template is None and not any(m.role == "user" for m in self.messages):
            raise ValueError("messages need at least one user message")
        if self.variables and self.template is None:
            raise ValueError("variables are only used with a template")
        if self.stream and self.json_schema is not None:
            raise ValueError(
                "a response_format json_schema answer is validated whole: it cannot be streamed"
            )
        return self

    @property
    def json_schema(self) -> dict[str, Any] | None:
        return self.response_format.answer_schema if self.response_format else None


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
    latency_ms: float = 0.0
