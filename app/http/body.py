"""Reading a request body with a size limit, before anything parses it."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.deps import SettingsDep

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The raw body, or 413 as soon as it is known to exceed `limit` bytes.

    Content-Length is checked first; the stream is also counted, for chunked bodies or a lying
    header, so an oversized body is never held in memory whole.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def limited_body(request: Request, settings: SettingsDep) -> bytes:
    """The body within MAX_BODY_BYTES. A dependency, so it is read once per request (a webhook
    credential check and the route share it) and after the dependencies listed before it: a
    route lists its caller first, so a stranger's oversized body is a 401, not a 413."""
    return await read_limited_body(request, settings.max_body_bytes)


LimitedBodyDep = Annotated[bytes, Depends(limited_body)]


def parse_body(model: type[ModelT], body: bytes) -> ModelT:
    """The JSON body as `model`, or the 422 of invalid_body (the /v1 routes turn that into
    OpenAI's 400)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise invalid_body(error) from None


def invalid_body(error: ValidationError) -> RequestValidationError:
    """FastAPI's 422 for a body its model refused: each error's field, message and type, never
    the value sent (`input`). The value may be customer text (PII has no place in an error
    body), and a JSON syntax error's is the whole raw body, which need not be UTF-8 (FastAPI's
    encoder would fail on it: a 500 instead of the 422)."""
    errors = [{k: v for k, v in e.items() if k != "input"} for e in error.errors(include_url=False)]
    return RequestValidationError(errors)
