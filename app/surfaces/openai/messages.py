"""OpenAI's chat messages on the wire: the roles, the content parts (text, image_url,
input_audio), the tool calls an assistant turn carries and the tool definitions a request
offers, checked the way OpenAI checks them, so a bad message is a 400 naming it. Also the rule a
caller's session id (`user`, X-Session-Id) follows on the /v1 routes."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
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

from app.pipelines.chat_wire import SESSION_ID_PATTERN, TEXT_PARTS_SEPARATOR

SESSION_ID_RULE = "1-128 characters: letters, digits and _ . : @ -, starting with a letter or digit"
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


def valid_session_id(value: str) -> bool:
    return re.fullmatch(SESSION_ID_PATTERN, value) is not None


def _user_is_session(value: str | None) -> str | None:
    if value is not None and not valid_session_id(value):
        raise ValueError(f"user is used as the session id: {SESSION_ID_RULE}")
    return value


# OpenAI's `user`, which cx-relay takes as the session id (when no X-Session-Id header says one)
SessionUser = Annotated[
    str | None,
    AfterValidator(_user_is_session),
    Field(json_schema_extra={"pattern": SESSION_ID_PATTERN}),
]


# --- content parts -------------------------------------------------------------------------------


class _Closed(BaseModel):
    """A content part and what it holds take OpenAI's fields only: an unknown one is a 400, not
    something silently dropped on the way to the model."""

    model_config = ConfigDict(extra="forbid")


class TextPart(_Closed):
    type: Literal["text"]
    text: str


class ImageURL(_Closed):
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


class ImagePart(_Closed):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Closed):
    data: str = Field(min_length=1)  # base64
    format: Literal["wav", "mp3"]


class AudioPart(_Closed):
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
