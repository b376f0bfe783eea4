"""POST /webhook/cognigy/fallback: thin — read, authenticate, parse, call the pipeline, log.

The pipeline meters every call (budget and ledger) itself; the router only logs the turn."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.requests import HTTPConnection

from app.core.deadline import Deadline
from app.core.errors import AuthenticationFailed
from app.core.principal import Principal
from app.core.scopes import INVOKE_SCOPES, missing_scope
from app.deps import SessionIdsDep, SettingsDep, WebhookAuthDep, parts_of
from app.http.body import LimitedBodyDep, parse_body
from app.http.caller import record_auth_failure, unauthorized
from app.http.openapi import HTTPError, ValidationErrorBody, error_response, json_request_body
from app.observability.logs import request_id_var
from app.observability.metrics import TURNS
from app.observability.request_tally import note_outcome
from app.surfaces.cognigy.pipeline import CognigyPipeline, TurnRecord
from app.surfaces.cognigy.schemas import CognigyResponse, CognigyTrigger

router = APIRouter(tags=["cognigy"])
log = logging.getLogger("cxrelay.cognigy")


async def get_cognigy_pipeline(connection: HTTPConnection) -> CognigyPipeline:
    return parts_of(connection).cognigy


async def webhook_caller(
    request: Request, body: LimitedBodyDep, webhook_auth: WebhookAuthDep
) -> Principal:
    """The caller, from the Cognigy credential (a signature covers the body, so it is read
    first), or 401; an access token must also hold an invoke scope (403 naming it)."""
    try:
        principal = webhook_auth.authenticate(request.headers, body)
    except AuthenticationFailed as failure:
        raise unauthorized(
            log, "webhook authentication failed", request, failure, challenge="Signature"
        ) from None
    if (problem := missing_scope(principal.scopes, INVOKE_SCOPES)) is not None:
        record_auth_failure(log, "webhook scope refused", request, "scope", problem)
        raise HTTPException(403, problem)
    return principal


CognigyPipelineDep = Annotated[CognigyPipeline, Depends(get_cognigy_pipeline)]
WebhookCallerDep = Annotated[Principal, Depends(webhook_caller)]


@router.post(
    "/webhook/cognigy/fallback",
    response_model=CognigyResponse,
    responses={
        400: error_response("confidence above the threshold: no fallback needed", HTTPError),
        401: error_response("missing or invalid webhook credential", HTTPError),
        403: error_response("an access token without an invoke scope", HTTPError),
        413: error_response("body over MAX_BODY_BYTES", HTTPError),
        422: error_response("malformed trigger; the detail names the field", ValidationErrorBody),
    },
    openapi_extra=json_request_body(CognigyTrigger),
)
async def cognigy_fallback(
    principal: WebhookCallerDep,
    body: LimitedBodyDep,
    settings: SettingsDep,
    session_ids: SessionIdsDep,
    pipeline: CognigyPipelineDep,
) -> CognigyResponse:
    trigger = parse_body(CognigyTrigger, body)
    threshold = settings.cognigy_confidence_threshold
    if trigger.confidence_score > threshold:
        raise HTTPException(
            400,
            f"confidenceScore {trigger.confidence_score} is above the fallback threshold "
            f"{threshold}: the NLU result should be used instead of this fallback",
        )

    deadline = Deadline.after(settings.cognigy_deadline_seconds)
    # the conversation id as stored and logged: a digest when it holds personal data
    turn = TurnRecord.start(request_id_var.get(), session_ids.stored(trigger.conversation_id))
    try:
        response = await asyncio.wait_for(
            pipeline.decide(trigger, principal, deadline, turn),
            timeout=deadline.remaining(),
        )
    except TimeoutError:
        response = pipeline.fallback(
            trigger,
            turn,
            "deadline_exceeded",
            f"no valid decision within {settings.cognigy_deadline_seconds}s",
        )
    if response.status == "success":
        note_outcome("success")
        TURNS.labels("cognigy", "cached" if turn.cached else "answered").inc()
    else:  # the route-to-human fallback, still a 200
        note_outcome("fallback", response.status)
        TURNS.labels("cognigy", response.status).inc()
    log.info(
        "cognigy turn",
        extra={
            "surface": "cognigy",
            "tenant": principal.tenant,
            "key_id": principal.key_id,
            "session_id": turn.session_id,
            "status": response.status,
            "context": response.context,
            "provider": response.provider,
            "model": response.model,
            "attempts": turn.attempts,
            "repaired": turn.repaired,
            "cached": turn.cached,
            "prompt_injection": list(turn.injection) or None,  # pattern names, never the text
            "cost_usd": turn.cost,
            "latency_ms": response.latency_ms,
            "prompt_tokens": response.usage.prompt_tokens,
            "completion_tokens": response.usage.completion_tokens,
        },
    )
    return response
