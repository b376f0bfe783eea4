"""What every chat wire shares (/chat, /ws/chat and OpenAI's /v1): the session id rule, the
message limits, `response_format` and the safety filter names. Kept below the surfaces, so
that the OpenAI surface and the chat surface read one definition without importing each other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.llm.types import OutputSchema

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
MAX_MESSAGES = 500
TEXT_PARTS_SEPARATOR = "\n"
SafetyFilterName = Literal["pii", "unsafe", "injection", "profanity", "self_harm"]


class JsonSchemaFormat(BaseModel):
    """OpenAI's `json_schema` response format: a name and the schema the answer must match."""

    name: str = Field("response", min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None

    # Whether the schema is itself valid JSON Schema is the pipeline's check (a 400, before any
    # upstream call), not this model's: a wrong schema is a bad request, not a malformed body.
    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    needs_schema: ClassVar[str] = 'response_format type "json_schema" needs json_schema.schema'

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.answer_schema is None:
            raise ValueError(self.needs_schema)
        return self

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the answer must match, when the type asks for one."""
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return None

    def output_schema(self) -> OutputSchema | None:
        """The schema as it goes to the model: named, and strict only when the caller said so
        (strict mode refuses a schema outside its subset, which a caller may not know)."""
        schema = self.answer_schema
        if schema is None:
            return None
        spec = self.json_schema
        if spec is None:
            return OutputSchema(schema)
        return OutputSchema(schema, spec.name, bool(spec.strict), spec.description)


class AnswerFormatted:
    """Both chat bodies' reading of their `response_format` (a mixin of ChatBody and
    ChatCompletionRequest, which declare the fields each in its own way)."""

    if TYPE_CHECKING:
        stream: bool | None
        response_format: ResponseFormat | None

    @property
    def json_schema(self) -> dict[str, Any] | None:
        return self.response_format.answer_schema if self.response_format else None

    @property
    def output_schema(self) -> OutputSchema | None:
        return self.response_format.output_schema() if self.response_format else None

    def check_streamable(self) -> None:
        """/v1's rule (OpenAI's clients expect a stream's chunks to be the answer as it will
        stand); /chat streams such an answer and checks it at the end instead."""
        if self.stream and self.json_schema is not None:
            raise ValueError(
                "a response_format json_schema answer is validated whole: it cannot be streamed"
            )
