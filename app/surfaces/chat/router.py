"""POST /chat: the internal tools' chat surface, JSON or (with `stream: true`) Server-Sent Events.

Thin: authenticate the client key, parse, build the call (rendering a template when one is
given), run the chat pipeline, shape the answer. Streamed frames are the /ws/chat ones:
`{"type": "content", "delta": ...}`, then `{"type": "complete", ...}` or `{"type": "error", ...}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.accounting.inbound_limits import InboundLimiter
from app.deps import (
    CallerTemplatesDep,
    ChatPipelineDep,
    LimiterDep,
    SessionIdsDep,
    SettingsDep,
)
from app.http.body import LimitedBodyDep, parse_body
from app.http.caller import InvokerDep
from app.http.chat_errors import error_frame, failure_response
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
from app.http.sse import event_stream, injection_header, sse
from app.pipelines.chat import ChatPipeline
from app.pipelines.chat_call import ChatCall, ChatOutcome
from app.pipelines.failures import describe
from app.pipelines.text_stream import TextStream, leased_stream
from app.surfaces.chat.calls import build_call, complete_frame, reply
from app.surfaces.chat.schemas import ChatBody, ChatReply, ChatUsage

router = APIRouter(tags=["chat"])


@router.post(
    "/chat",
    response_model=ChatReply,
    responses={
        200: sse_response(
            "the answer; with `stream: true`, its frames as events",
            chat_frames(ChatReply, ChatUsage),
        ),
        400: error_response(
            "the newest message does not fit the context window, or the response_format schema "
            "is not valid JSON Schema",
            ChatError,
        ),
        401: error_response("missing or unknown client API key", HTTPError),
        403: error_response("a scoped key or token without an invoke scope", HTTPError),
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
    principal: InvokerDep,
    body: LimitedBodyDep,
    settings: SettingsDep,
    templates: CallerTemplatesDep,
    session_ids: SessionIdsDep,
    limits: LimiterDep,
    pipeline: ChatPipelineDep,
) -> Any:
    parsed = parse_body(ChatBody, body)
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


async def _stream(
    call: ChatCall, limits: InboundLimiter, pipeline: ChatPipeline, raw_output: bool
) -> Any:
    try:
        stream: TextStream[ChatOutcome] = await leased_stream(
            limits, call.principal, lambda put: pipeline.run(call, put)
        )
    except Exception as error:  # no stream slot, or refused before any text: a proper status
        return failure_response(error, raw_output=raw_output)

    async def events() -> AsyncIterator[str]:
        try:
            async for text in stream.texts():
                yield sse({"type": "content", "delta": text})
            outcome = await stream.result()
        except Exception as error:  # after the 200: the error travels as a frame
            await stream.close()
            failure = describe(error)
            note_failure(failure)
            yield sse(error_frame(failure))
            return
        await stream.close()  # the slot is free before the client can read the end
        yield sse(complete_frame(call, outcome))

    return event_stream(events(), stream, call.injection)
