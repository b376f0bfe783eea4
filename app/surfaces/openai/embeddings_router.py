"""POST /v1/embeddings for the official OpenAI clients (and Cognigy's Knowledge AI, retrieval
tools): the same client keys, OpenAI error shapes (app.surfaces.openai.errors) and session rules
(app.surfaces.openai.session) as /v1/chat/completions, routed to embedding models and metered
into the same budgets and ledger under the surface `embeddings`
(app.surfaces.openai.embeddings_pipeline)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from app.deps import SessionIdsDep, parts_of
from app.http.body import LimitedBodyDep, parse_body
from app.http.caller import InvokerDep
from app.http.openapi import json_request_body
from app.surfaces.openai.embeddings_pipeline import (
    EmbeddingsCall,
    EmbeddingsOutcome,
    EmbeddingsPipeline,
    InputTooLong,
)
from app.surfaces.openai.embeddings_schemas import EmbeddingList, EmbeddingsRequest
from app.surfaces.openai.errors import ERRORS, OpenAIError, OpenAIRoute
from app.surfaces.openai.session import session_of

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


async def get_embeddings_pipeline(connection: HTTPConnection) -> EmbeddingsPipeline:
    return parts_of(connection).embeddings


EmbeddingsPipelineDep = Annotated[EmbeddingsPipeline, Depends(get_embeddings_pipeline)]

REFUSALS: dict[int | str, dict[str, Any]] = {
    **{status: ERRORS[status] for status in (401, 404, 413, 429, 502, 503)},
    400: {**ERRORS[400], "description": "invalid request, or an input longer than the model takes"},
    504: {**ERRORS[504], "description": "no answer within EMBEDDINGS_DEADLINE_SECONDS"},
}


@router.post(
    "/embeddings",
    response_model=EmbeddingList,
    responses=REFUSALS,
    openapi_extra=json_request_body(EmbeddingsRequest),
)
async def embeddings(
    request: Request,
    principal: InvokerDep,
    raw: LimitedBodyDep,
    session_ids: SessionIdsDep,
    pipeline: EmbeddingsPipelineDep,
) -> Any:
    body = parse_body(EmbeddingsRequest, raw)  # OpenAIRoute makes its 422 OpenAI's 400
    call = EmbeddingsCall(
        principal=principal,
        session_id=session_of(request, body, session_ids),
        model=body.model,
        inputs=body.inputs,
        dimensions=body.dimensions,
        encoding_format=body.encoding_format,
    )
    try:
        outcome = await pipeline.run(call)
    except InputTooLong as error:
        raise OpenAIError(
            400, str(error), code="context_length_exceeded", param=f"input[{error.index}]"
        ) from None
    return JSONResponse(_answer(call, outcome))


def _answer(call: EmbeddingsCall, outcome: EmbeddingsOutcome) -> dict[str, Any]:
    """EmbeddingList, built as a dict: a model per vector would cost more than the call."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(outcome.vectors)
        ],
        "model": outcome.model,
        "usage": {
            "prompt_tokens": outcome.usage.prompt_tokens,
            "total_tokens": outcome.usage.prompt_tokens,
        },
        "cx_relay": {
            "session_id": call.session_id or None,
            "cost": outcome.cost,
            "provider": outcome.provider,
            "model": outcome.model_used,
            "usage_estimated": outcome.usage_estimated,
            "latency_ms": outcome.latency_ms,
        },
    }
