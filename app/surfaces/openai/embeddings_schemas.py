"""OpenAI's embeddings wire: the request the official clients send to `POST /v1/embeddings` and
the `list` of `embedding` objects they parse.

Honoured: model, input (a string, a list of strings, a list of token ids, or a list of token-id
lists; at most MAX_INPUTS inputs, none empty), dimensions, encoding_format (`float`, OpenAI's
default, or `base64`, which the official Python client asks for unless told otherwise) and user
(the session id when no X-Session-Id header, as on /v1/chat/completions). Other fields are
accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from app.llm.embeddings import Input
from app.surfaces.openai.messages import SessionUser

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request
MAX_DIMENSIONS = 8192  # above every embedding model's size; what the provider takes is its own
MAX_TOKEN_ID = 2**31 - 1
_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"

_TOKEN_IDS: dict[str, Any] = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
    "minItems": 1,
}
INPUT_SCHEMA: dict[str, Any] = {
    "description": f"The text(s) to embed: {_SHAPES}; at most {MAX_INPUTS} inputs, none empty",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "maxItems": MAX_INPUTS,
        },
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_INPUTS},
    ],
}


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    input: Annotated[Any, WithJsonSchema(INPUT_SCHEMA)]  # checked below, for messages that say
    dimensions: int | None = Field(None, ge=1, le=MAX_DIMENSIONS)
    encoding_format: Literal["float", "base64"] = "float"
    user: SessionUser = None

    @field_validator("input")
    @classmethod
    def _one_of_the_shapes(cls, value: Any) -> Any:
        """Which item is wrong, in words (a union type's own errors would list every shape);
        token ids as ints (JSON Schema's integers include 7.0)."""
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be empty")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {_SHAPES}, not empty")
        if all(_token_id(item) for item in value):
            return [int(item) for item in value]  # one input, as token ids
        if len(value) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs in one request, got {len(value)}")
        texts = all(isinstance(item, str) for item in value)
        if not texts and not all(isinstance(item, list) for item in value):
            raise ValueError(f"must be {_SHAPES}")
        for index, item in enumerate(value):
            if not item:
                raise ValueError(f"input[{index}] is empty")
            if not texts and not all(_token_id(token) for token in item):
                raise ValueError(f"input[{index}] must be token ids (integers from 0)")
        return value if texts else [[int(token) for token in item] for item in value]

    @property
    def inputs(self) -> tuple[Input, ...]:
        """One entry per vector to answer: a text, or token ids."""
        if isinstance(self.input, str):
            return (self.input,)
        if all(isinstance(item, int) for item in self.input):
            return (tuple(self.input),)
        return tuple(item if isinstance(item, str) else tuple(item) for item in self.input)


def _token_id(value: Any) -> bool:
    whole = type(value) is int or (type(value) is float and value.is_integer())
    return whole and 0 <= value <= MAX_TOKEN_ID


# --- responses ----------------------------------------------------------------------------------


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: little-endian float32, as OpenAI sends it


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingExtras(BaseModel):
    """What the gateway did, in a top-level field the OpenAI clients keep but do not read."""

    session_id: str | None  # None: the call named no session (X-Session-Id or `user`)
    cost: float
    provider: str
    model: str  # the configured model that answered
    usage_estimated: bool = False
    latency_ms: float = 0.0


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    cx_relay: EmbeddingExtras
