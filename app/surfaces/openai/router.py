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

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.accounting.inbound_limits import InboundLimiter
from app.core.ids import new_id
from app.core.principal import Principal
from app.core.scopes import INFERENCE_READ, INVOKE_SCOPES
from app.deps import ChatPipelineDep, LimiterDep, RouterSlotDep, SessionIdsDep
from app.http.body import LimitedBodyDep, parse_body
from app.http.caller import InvokerDep, require_scope
from app.http.openapi import json_request_body, response_schema, sse_response
from app.http.sse import event_stream, injection_header, sse
from app.pipelines.chat import ChatPipeline
from app.pipelines.chat_call import ChatCall, ChatOutcome
from app.pipelines.text_stream import TextStream, leased_stream
from app.surfaces.openai.errors import ERRORS, OpenAIRoute, openai_failure
from app.surfaces.openai.messages import ToolCall
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
    ModelCard,
    ModelList,
)
from app.surfaces.openai.session import session_of

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
# listing models: what a scoped credential that may call them, or only read, may do
ModelReaderDep = Annotated[Principal, Depends(require_scope(*INVOKE_SCOPES, INFERENCE_READ))]


@router.get("/models", response_model=ModelList, responses={401: ERRORS[401]})
async def models(principal: ModelReaderDep, slot: RouterSlotDep) -> ModelList:
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
    principal: InvokerDep,
    raw: LimitedBodyDep,
    session_ids: SessionIdsDep,
    limits: LimiterDep,
    pipeline: ChatPipelineDep,
) -> Any:
    body = parse_body(ChatCompletionRequest, raw)  # OpenAIRoute makes its 422 OpenAI's 400
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
    return f"chatcmpl-{new_id()[:24]}"


def usage_of(outcome: ChatOutcome) -> CompletionUsage:
    usage = outcome.usage
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def extras(call: ChatCall, outcome: ChatOutcome) -> CxRelayExtras:
    return CxRelayExtras(session_id=call.session_id or None, **outcome.report())


async def _stream(
    call: ChatCall, body: ChatCompletionRequest, limits: InboundLimiter, pipeline: ChatPipeline
) -> Any:
    """Nothing is sent until the first text (or the end): a refusal before it is still a
    proper HTTP error; after it, an SSE `{"error": ...}` event ends the stream. Chunks carry
    the requested model name: the one that answered is only known at the end (cx_relay)."""
    stream: TextStream[ChatOutcome] = await leased_stream(  # RateLimited: 429
        limits, call.principal, lambda put: pipeline.run(call, put)
    )
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
            failure = openai_failure(error)
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

    return event_stream(events(), stream, call.injection)
