"""POST /v1/chat/completions and GET /v1/models for the official OpenAI clients.

The same chat pipeline and client keys as /chat, on OpenAI's wire: `chat.completion` objects,
`chat.completion.chunk` Server-Sent Events ending in `data: [DONE]`, and every failure (the key
check, request validation and the 413 included) in OpenAI's `{"error": {...}}` shape with the
status that makes the client raise the matching exception class. What cx-relay did (cost, cache,
session) travels in a top-level `cx_relay` field the clients ignore.

Session: the `X-Session-Id` header, else the request's `user` (either as a digest when it holds
personal data: app.safety.session_ids), else none (NO_SESSION): then only the tenant's day and
month budgets hold the call, and its ledger record has no session.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Protocol

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from app.accounting.inbound_limits import InboundLimiter
from app.core.principal import Principal
from app.deps import ChatPipelineDep, LimiterDep, RouterSlotDep, SessionIdsDep, SettingsDep
from app.http.body import read_limited_body
from app.http.caller import CallerDep
from app.http.chat_errors import ChatFailure, describe
from app.http.openapi import json_request_body, response_schema, sse_response
from app.http.request_metrics import note_failure, note_status
from app.pipelines.chat import ChatPipeline
from app.pipelines.chat_call import ChatCall, ChatOutcome
from app.pipelines.text_stream import TextStream
from app.safety.session_ids import SessionIds
from app.store import NO_SESSION
from app.surfaces.chat.router import event_stream, injection_header, sse
from app.surfaces.openai.messages import SESSION_ID_RULE, ToolCall, valid_session_id
from app.surfaces.openai.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    ChunkDelta,
    ChunkFunction,
    ChunkToolCall,
    CompletionUsage,
    CxRelayExtras,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
)

log = logging.getLogger("cxrelay.openai")

NO_RETRY = {"x-should-retry": "false"}  # the official clients honour it: retrying cannot help


class OpenAIError(Exception):
    """A failure already in OpenAI's terms; the route class turns it into the response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, code=code, param=param, **extra or {})
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorBody(error=self.detail).model_dump(mode="json")
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_http(error: HTTPException) -> OpenAIError:
    """The key check (401) and the body limit (413) raise FastAPI's HTTPException."""
    codes = {401: "invalid_api_key", 413: "request_too_large"}
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return OpenAIError(
        error.status_code,
        str(error.detail),
        type=kind,
        code=codes.get(error.status_code),
        headers=dict(error.headers or {}),
    )


def from_validation(errors: Sequence[Any]) -> OpenAIError:
    """OpenAI answers an invalid request with 400 naming the first offending parameter."""
    if not errors:
        return OpenAIError(400, "invalid request")
    first = errors[0]
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return OpenAIError(400, f"the request body is not valid JSON: {reason}")
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is not None:
        message = f"Invalid '{param}': {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    if kind == "missing":
        code = "missing_required_parameter"
    elif kind.endswith(("_type", "_parsing")):
        code = "invalid_type"
    else:
        code = "invalid_value"
    return OpenAIError(400, message, code=code, param=param)


def from_failure(failure: ChatFailure) -> OpenAIError:
    """The chat pipeline's refusals (app.http.chat_errors) on OpenAI's wire."""
    if failure.code == "rate_limit_exceeded":  # retrying after Retry-After helps
        limit = {k: v for k, v in failure.detail.items() if k not in ("error", "message")}
        headers = failure.headers or NO_RETRY  # no Retry-After: the call can never fit
        return OpenAIError(
            429,
            failure.message,
            type=failure.code,
            code=failure.code,
            extra={"limit": limit},
            headers=headers,
        )
    if failure.code == "budget_exhausted":
        budget = {k: v for k, v in failure.detail.items() if k not in ("error", "message")}
        return OpenAIError(
            429,
            failure.message,
            type="insufficient_quota",
            code=failure.code,
            extra={"budget": budget},
            headers=NO_RETRY,
        )
    params = {"context_length_exceeded": "messages", "model_not_found": "model"}
    kind = "invalid_request_error" if failure.status < 422 else "server_error"
    return OpenAIError(
        failure.status,
        failure.message,
        type=kind,
        code=failure.code,
        param=failure.detail.get("param") or params.get(failure.code),
        headers=NO_RETRY if failure.code == "upstream_rejected" else None,
    )


def to_openai(error: Exception) -> OpenAIError:
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, HTTPException):
        return from_http(error)
    if isinstance(error, RequestValidationError):
        return from_validation(error.errors())
    failure = describe(error)
    if failure is not None:
        return from_failure(failure)
    log.error("unexpected error on the OpenAI surface", exc_info=error)
    return OpenAIError(500, "internal error", type="server_error", code="internal_error")


class OpenAIRoute(APIRoute):
    """Failures leave these routes in OpenAI's shape, including the CallerDep's 401 and FastAPI's
    own validation, which would otherwise get the app-wide `{"detail": ...}` body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:
                note_failure(error)  # a rate-limit refusal is counted by its own reason
                return to_openai(error).response()

        return guarded


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "invalid request, or the newest message does not fit the context window",
        401: "missing or unknown client API key",
        404: "unknown model",
        413: "body over MAX_BODY_BYTES",
        422: "an answer that broke response_format after one repair",
        429: "an inbound limit (type rate_limit_exceeded, with Retry-After) or an exhausted "
        "session or tenant budget (type insufficient_quota)",
        502: "no provider could answer",
        503: "the budget store cannot be read",
        504: "no answer within CHAT_DEADLINE_SECONDS",
    }.items()
}


@router.get("/models", response_model=ModelList, responses={401: ERRORS[401]})
async def models(principal: CallerDep, slot: RouterSlotDep) -> ModelList:
    """Every route and provider model the gateway can be asked for."""
    return ModelList(data=[ModelCard(id=name) for name in slot.current.model_names()])


STREAMED: dict[int | str, dict[str, Any]] = {
    200: sse_response(
        "a chat.completion; with `stream: true`, chat.completion.chunk events, then [DONE] (or "
        "an error event when the call failed after the first text)",
        [response_schema(ChatCompletionChunk), response_schema(ErrorBody)],
        done="[DONE]",
    )
}


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**STREAMED, **ERRORS},
    openapi_extra=json_request_body(ChatCompletionRequest),
)
async def chat_completions(
    request: Request,
    principal: CallerDep,
    settings: SettingsDep,
    session_ids: SessionIdsDep,
    limits: LimiterDep,
    pipeline: ChatPipelineDep,
) -> Any:
    raw = await read_limited_body(request, settings.max_body_bytes)
    try:
        body = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as error:
        raise from_validation(error.errors(include_url=False)) from None
    call = build_call(body, principal, session_of(request, body, session_ids))
    if body.stream:
        return await _stream(call, body, limits, pipeline)
    outcome = await pipeline.run(call)
    completion = ChatCompletion(
        id=completion_id(),
        created=int(time.time()),
        model=outcome.model,
        choices=[
            Choice(
                message=AssistantMessage(
                    content=outcome.content or (None if outcome.tool_calls else ""),
                    tool_calls=[ToolCall.model_validate(c) for c in outcome.tool_calls] or None,
                ),
                finish_reason=outcome.finish_reason,
            )
        ],
        usage=usage_of(outcome),
        cx_relay=extras(call, outcome),
    )
    return JSONResponse(
        completion.model_dump(mode="json"), headers=injection_header(outcome.injection)
    )


class NamesAUser(Protocol):
    """A /v1 request body: chat completions and embeddings both take OpenAI's `user`."""

    @property
    def user(self) -> str | None: ...


def session_of(request: Request, body: NamesAUser, session_ids: SessionIds) -> str:
    """The stored session id (a digest when the one sent holds personal data), or NO_SESSION."""
    header = request.headers.get("x-session-id")
    if header is not None:
        if not valid_session_id(header):
            raise OpenAIError(400, f"X-Session-Id must be {SESSION_ID_RULE}", param="X-Session-Id")
        return session_ids.stored(header)
    return session_ids.stored(body.user) if body.user else NO_SESSION


def build_call(body: ChatCompletionRequest, principal: Principal, session_id: str) -> ChatCall:
    rf = body.response_format
    return ChatCall(
        principal=principal,
        session_id=session_id,
        messages=[m.wire() for m in body.messages],
        surface="openai",
        model=body.model,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        fallback_models=body.fallback_models,
        safety_filters=body.safety_filters,
        output_schema=body.output_schema,
        json_object=rf is not None and rf.type == "json_object",
        tools=body.tool_definitions(),
        tool_choice=body.tool_choice_value(),
        parallel_tool_calls=body.parallel_tool_calls,
        options=body.options(),
    )


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage_of(outcome: ChatOutcome) -> CompletionUsage:
    usage = outcome.usage
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def extras(call: ChatCall, outcome: ChatOutcome) -> CxRelayExtras:
    return CxRelayExtras(
        session_id=call.session_id or None,
        cost=outcome.cost,
        cached=outcome.cached,
        lightweight_mode=outcome.lightweight,
        provider=outcome.provider,
        model=outcome.model,
        prompt_injection=list(outcome.injection),
        blocked=outcome.blocked,
        dropped_turns=outcome.dropped,
        usage_estimated=outcome.usage_estimated,
        latency_ms=outcome.latency_ms,
        output=outcome.parsed,
    )


async def _stream(
    call: ChatCall, body: ChatCompletionRequest, limits: InboundLimiter, pipeline: ChatPipeline
) -> Any:
    """Nothing is sent until the first text (or the end): a refusal before it is still a
    proper HTTP error; after it, an SSE `{"error": ...}` event ends the stream. Chunks carry
    the requested model name: the one that answered is only known at the end (cx_relay)."""
    lease = await limits.open_stream(call.principal)  # RateLimited: 429
    stream: TextStream[ChatOutcome] = TextStream(lambda put: pipeline.run(call, put), lease)
    try:
        await stream.start()
    except BaseException:
        await stream.close()
        raise
    cid, created = completion_id(), int(time.time())

    def chunk(choices: list[ChunkChoice], **fields: Any) -> str:
        frame = ChatCompletionChunk(
            id=cid, created=created, model=body.model, choices=choices, **fields
        )
        return sse(frame.wire())

    async def events() -> AsyncIterator[str]:
        try:
            yield chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
            async for text in stream.texts():
                yield chunk([ChunkChoice(delta=ChunkDelta(content=text))])
            outcome = await stream.result()
        except Exception as error:  # after the 200: the error travels as an event
            await stream.close()
            failure = to_openai(error)
            note_status(failure.status)
            yield sse(ErrorBody(error=failure.detail).model_dump(mode="json"))
            return
        await stream.close()  # the slot is free before the client can read [DONE]
        for index, call_made in enumerate(outcome.tool_calls):
            # OpenAI's pieces: the id, type and name first, then the arguments (whole here: they
            # were checked by the guard before anything of them went out)
            function = call_made["function"]
            opening = ChunkToolCall(
                index=index,
                id=call_made["id"],
                type="function",
                function=ChunkFunction(name=function["name"], arguments=""),
            )
            rest = ChunkToolCall(
                index=index, function=ChunkFunction(arguments=function["arguments"])
            )
            for piece in (opening, rest):
                yield chunk([ChunkChoice(delta=ChunkDelta(tool_calls=[piece]))])
        finish = ChunkChoice(finish_reason=outcome.finish_reason)
        yield chunk([finish], cx_relay=extras(call, outcome))
        if body.include_usage:
            yield chunk([], usage=usage_of(outcome))
        yield "data: [DONE]\n\n"

    return event_stream(events(), call, stream)
