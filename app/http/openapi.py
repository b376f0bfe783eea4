"""What the OpenAPI document says about the bodies the routes read themselves, and about the error
bodies they answer with.

The webhook and chat routes read the raw body (the size limit and the signature come before any
parsing), so FastAPI cannot see their request models: `json_request_body` puts each model's JSON
Schema in the operation instead, so the published document, and anything generating requests from
it, knows what to send. The error models are the bodies FastAPI's HTTPException and validation
handlers produce, and the chat routes' own refusals.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class HTTPError(BaseModel):
    """FastAPI's HTTPException body: one sentence saying what was wrong."""

    detail: str


class FieldError(BaseModel):
    model_config = ConfigDict(extra="allow")  # `input` and `ctx`, when pydantic gives them

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """A malformed body: `detail[].loc` names the field (empty for JSON that does not parse)."""

    detail: list[FieldError]


class ChatError(BaseModel):
    """A chat call the pipeline refused or could not answer (app.http.chat_errors)."""

    model_config = ConfigDict(extra="allow")  # e.g. the refused budget's scope and figures

    error: str
    message: str


def error_response(description: str, *models: type[BaseModel]) -> dict[str, Any]:
    """A `responses=` entry whose JSON body is one of `models`."""
    schemas = [response_schema(m) for m in models]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def sse_response(
    description: str, events: list[dict[str, Any]], done: str | None = None
) -> dict[str, Any]:
    """A 200 `responses=` entry for Server-Sent Events. OpenAPI 3.1 reads a `text/event-stream`
    schema as one event: its `data` is JSON matching one of `events`, or the `done` marker."""
    data: dict[str, Any] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": events},
    }
    if done is not None:
        data = {"anyOf": [{"const": done}, data]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"description": description, "content": {"text/event-stream": {"schema": event}}}


def chat_frames(reply_model: type[BaseModel], usage_model: type[BaseModel]) -> list[dict[str, Any]]:
    """The frames of a streamed /chat answer (and /ws/chat): content deltas, then the complete
    frame (the reply's fields but the text, with usage) or an error frame. The chat surface
    passes its models in: this layer knows no surface."""
    reply = response_schema(reply_model)
    complete = {
        **reply,
        "properties": {
            **{k: v for k, v in reply["properties"].items() if k != "response"},
            "type": {"const": "complete"},
            "usage": response_schema(usage_model),
        },
        "required": [*(r for r in reply.get("required", []) if r != "response"), "type", "usage"],
    }
    text = {"type": "string"}
    content = _frame("content", delta=text)
    return [content, complete, _frame("error", code=text, message=text)]


def _frame(kind: str, **fields: dict[str, Any]) -> dict[str, Any]:
    properties = {"type": {"const": kind}, **fields}
    return {"type": "object", "required": list(properties), "properties": properties}


def response_schema(model: type[BaseModel]) -> dict[str, Any]:
    return _inline(model.model_json_schema(mode="serialization"))


def json_request_body(model: type[BaseModel], *media_types: str) -> dict[str, Any]:
    """`openapi_extra` documenting a body a route reads itself as `model` (validation side, by
    the names the senders use)."""
    schema = _inline(model.model_json_schema(by_alias=True, mode="validation"))
    content = {media: {"schema": schema} for media in media_types or ("application/json",)}
    return {"requestBody": {"required": True, "content": content}}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic's `#/$defs/...` references resolve against the whole OpenAPI document once the
    schema is embedded in it, so they are replaced by what they point to (none is recursive)."""
    definitions: dict[str, Any] = schema.get("$defs", {})

    def resolve(node: Any, trail: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [resolve(item, trail) for item in node]
        if not isinstance(node, dict):
            return node
        reference = node.get("$ref")
        if isinstance(reference, str) and reference.startswith("#/$defs/"):
            name = reference.removeprefix("#/$defs/")
            if name in trail:
                raise ValueError(f"{name} is recursive: it cannot be inlined")
            siblings = {k: resolve(v, trail) for k, v in node.items() if k != "$ref"}
            return {**resolve(definitions[name], (*trail, name)), **siblings}
        return {k: resolve(v, trail) for k, v in node.items() if k != "$defs"}

    resolved: dict[str, Any] = resolve(schema, ())
    return resolved
