"""POST /chat: the internal tools' chat surface, JSON or (with `stream: true`) Server-Sent Events.

Thin: authenticate the client key, parse, build the call (rendering a template when one is
given), run the chat pipeline, shape the answer. Streamed frames are the /ws/chat ones:
`{"type": "content", "delta": ...}`, then `{"type": "complete", ...}` or `{"type": "error", ...}`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from app.accounting.inbound_limits import InboundLimiter
from app.core.errors import RateLimited
from app.core.principal import Principal
from app.deps import (
    CallerTemplatesDep,
    ChatPipelineDep,
    LimiterDep,
    SessionIdsDep,
    SettingsDep,
)
from app.http.body import invalid_body, read_limited_body
from app.http.caller import CallerDep
from app.http.chat_errors import describe
from app.http.openapi import (
    ChatError,
    HTTPError,
    ValidationErrorBody,
    chat_frames,
    error_response,
    json_request_body,
    sse_response,
)
from app.http.request_metrics import note_failure
from app.pipelines.chat import ChatPipeline
from app.pipelines.chat_call import ChatCall, ChatOutcome
from app.pipelines.text_stream import TextStream
from app.prompts.caller_templates import CallerTemplates
from app.safety.session_ids import SessionIds
from app.surfaces.chat.schemas import ChatBody, ChatReply

router = APIRouter(tags=["chat"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post(
    "/chat",
    response_model=ChatReply,
    responses={
        200: sse_response("the answer; with `stream: true`, its frames as events", chat_frames()),
        400: error_response(
            "the newest message does not fit the context window, or the response_format schema "
            "is not valid JSON Schema",
            ChatError,
        ),
        401: error_response("missing or unknown client API key", HTTPError),
        404: error_response("unknown model", ChatError),
        413: error_response("body over MAX_BODY_BYTES", HTTPError),
        422: error_response(
            "malformed request, a template that does not render, or an answer that broke "
            "response_format after one repair",
            ValidationErrorBody,
            HTTPError,
            ChatError,
        ),
        429: error_response(
            "an inbound limit (`rate_limit_exceeded`, with Retry-After) or a session or tenant "
            "budget (`budget_exhausted`) refuses the request",
            ChatError,
        ),
        502: error_response("no provider could answer", ChatError),
        503: error_response("the budget store cannot be read", ChatError),
        504: error_response("no answer within CHAT_DEADLINE_SECONDS", ChatError),
    },
    openapi_extra=json_request_body(ChatBody),
)
async def chat(
    request: Request,
    principal: CallerDep,
    settings: SettingsDep,
    templates: CallerTemplatesDep,
    session_ids: SessionIdsDep,
    limits: LimiterDep,
    pipeline: ChatPipelineDep,
) -> Any:
    body = await read_limited_body(request, settings.max_body_bytes)
    try:
        parsed = ChatBody.model_validate_json(body)
    except ValidationError as error:
        raise invalid_body(error) from None
    call = build_call(parsed, principal, templates, session_ids)
    if parsed.stream:
        return await _stream(call, limits, pipeline, settings.debug_failed_output)
    try:
        outcome = await pipeline.run(call)
    except Exception as error:  # the deadline's TimeoutError too: a 504, not a 500
        return failure_response(error, raw_output=settings.debug_failed_output)
    return JSONResponse(
        reply(call, outcome).model_dump(), headers=injection_header(outcome.injection)
    )


def build_call(
    body: ChatBody,
    principal: Principal,
    templates: CallerTemplates,
    session_ids: SessionIds,
    surface: str = "chat",
) -> ChatCall:
    messages = [m.model_dump() for m in body.messages]
    if body.template is not None:
        try:
            text = templates.render(body.template, body.variables)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        messages.append({"role": "user", "content": text})
    rf = body.response_format
    return ChatCall(
        principal=principal,
        session_id=session_ids.stored(body.session_id),  # a digest when it is PII
        messages=messages,
        surface=surface,
        model=body.model,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        fallback_models=body.fallback_models,
        safety_filters=body.safety_filters,
        output_schema=body.output_schema,
        json_object=rf is not None and rf.type == "json_object",
    )


def reply(call: ChatCall, outcome: ChatOutcome) -> ChatReply:
    return ChatReply(
        session_id=call.session_id,
        response=outcome.content,
        prompt_tokens=outcome.usage.prompt_tokens,
        completion_tokens=outcome.usage.completion_tokens,
        cost=outcome.cost,
        lightweight_mode=outcome.lightweight,
        cached=outcome.cached,
        model=outcome.model,
        provider=outcome.provider,
        finish_reason=outcome.finish_reason,
        output=outcome.parsed,
        dropped_turns=outcome.dropped,
        prompt_injection=list(outcome.injection),
        blocked=outcome.blocked,
        usage_estimated=outcome.usage_estimated,
        latency_ms=outcome.latency_ms,
        model_used=outcome.model_used,
    )


def injection_header(found: tuple[str, ...]) -> dict[str, str]:
    """Flag mode's signal to the caller: the pattern names, never the matched text."""
    return {"X-Prompt-Injection": ",".join(found)} if found else {}


def failure_response(error: Exception, *, raw_output: bool = False) -> JSONResponse:
    """The error's status and body; an error the pipeline does not raise on purpose is re-raised.
    `raw_output` (DEBUG_FAILED_OUTPUT) adds the model's text to an output_invalid body."""
    failure = describe(error, raw_output=raw_output)
    if failure is None:
        raise error
    note_failure(error)  # a rate-limit refusal is counted by its own reason, not just 429
    body = {"error": failure.code, "message": failure.message, **failure.detail}
    return JSONResponse(body, status_code=failure.status, headers=failure.headers)


def complete_frame(call: ChatCall, outcome: ChatOutcome) -> dict[str, Any]:
    """The last frame of a streamed answer (SSE and /ws/chat)."""
    frame = reply(call, outcome).model_dump()
    frame.pop("response")
    return {
        "type": "complete",
        "usage": outcome.usage.as_dict(),
        "model": outcome.model,
        "cost": outcome.cost,
        **frame,
    }


def error_frame(error: BaseException) -> dict[str, Any]:
    failure = describe(error) if isinstance(error, Exception) else None
    if failure is None:
        return {"type": "error", "code": "internal_error", "message": "internal error"}
    return {"type": "error", "code": failure.code, "message": failure.message}


async def _stream(
    call: ChatCall, limits: InboundLimiter, pipeline: ChatPipeline, raw_output: bool
) -> Any:
    try:
        lease = await limits.open_stream(call.principal)  # concurrent streams
    except RateLimited as limited:
        return failure_response(limited)
    stream: TextStream[ChatOutcome] = TextStream(lambda put: pipeline.run(call, put), lease)
    try:
        await stream.start()
    except BaseException as error:
        await stream.close()
        if isinstance(error, Exception):  # refused before any text: a proper status
            return failure_response(error, raw_output=raw_output)
        raise  # cancelled: the client went away

    async def events() -> AsyncIterator[str]:
        try:
            async for text in stream.texts():
                yield sse({"type": "content", "delta": text})
            outcome = await stream.result()
        except Exception as error:  # after the 200: the error travels as a frame
            await stream.close()
            note_failure(error)
            yield sse(error_frame(error))
            return
        await stream.close()  # the slot is free before the client can read the end
        yield sse(complete_frame(call, outcome))

    return event_stream(events(), call, stream)


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that closes its TextStream however the response ends: the body
    sent, the client gone (its task cancelled, the generator maybe never started), an error."""

    def __init__(self, content: AsyncIterator[str], stream: TextStream[Any], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.close()


def event_stream(
    events: AsyncIterator[str], call: ChatCall, stream: TextStream[Any]
) -> StreamingResponse:
    """The text/event-stream response; the input was checked before the first text, so flag
    mode's X-Prompt-Injection header goes out with it."""
    headers = {**SSE_HEADERS, **injection_header(call.injection)}
    return ClosingStreamingResponse(events, stream, media_type="text/event-stream", headers=headers)


def sse(frame: dict[str, Any]) -> str:
    return f"data: {json.dumps(frame, ensure_ascii=False)}\n\n"
