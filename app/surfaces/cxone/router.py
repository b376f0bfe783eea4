"""POST /webhook/cxone: the Virtual Agent Hub custom exchange endpoint (thin: read, authenticate,
parse, run the turn inside its deadline, log, answer in CXone's shape). The pipeline meters every
call (budget and ledger) itself."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from app.core.deadline import Deadline
from app.core.errors import AuthenticationFailed
from app.core.principal import DEFAULT_TENANT, Principal
from app.deps import CXoneAuthorizationsDep, SettingsDep, parts_of
from app.http.body import parse_body, read_limited_body
from app.http.caller import unauthorized
from app.http.openapi import HTTPError, ValidationErrorBody, error_response, json_request_body
from app.observability.logs import request_id_var
from app.observability.metrics import BOT_STATE_REJECTED, TURNS
from app.observability.request_tally import note_outcome
from app.surfaces.cxone.pipeline import CXoneBotPipeline
from app.surfaces.cxone.reply import BotTurn
from app.surfaces.cxone.schemas import BotExchangeResponse, ExternalIntegrationBotExchangeRequest

router = APIRouter(tags=["cxone"])


log = logging.getLogger("cxrelay.cxone")

JSON_TYPES = ("application/json", "text/json")
# Turn outcomes where the bot could not answer (a 200 all the same: CXone gets a valid branch).
FALLBACKS = frozenset({"fallback", "fallback_escalated", "budget_exhausted", "rate_limited"})


def _is_json(content_type: str) -> bool:
    """application/json, text/json and application/*+json, as NICE's spec lists."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


DISABLED = "the CXone webhook is disabled until CXONE_WEBHOOK_AUTHORIZATION is set"


async def cxone_caller(
    request: Request, settings: SettingsDep, accepted: CXoneAuthorizationsDep
) -> Principal:
    """The caller, or 401. The matching CXONE_WEBHOOK_AUTHORIZATION entry's tenant (`value:tenant`;
    the default one without) is the turn's: budgets, cache and ledger count it there. No values
    configured: only ALLOW_UNAUTHENTICATED_WEBHOOKS lets a request in (the default tenant)."""
    try:
        if accepted.configured:
            return accepted.authenticate(request.headers.get("authorization", ""))
        if settings.allow_unauthenticated_webhooks:
            return Principal(DEFAULT_TENANT, "unauthenticated", "anonymous", "none")
        raise AuthenticationFailed(DISABLED, "disabled")
    except AuthenticationFailed as failure:
        raise unauthorized(
            log, "webhook authentication failed", request, failure, challenge=None
        ) from None


async def get_cxone_bot_pipeline(connection: HTTPConnection) -> CXoneBotPipeline:
    return parts_of(connection).cxone_bot


CXoneCallerDep = Annotated[Principal, Depends(cxone_caller)]
CXoneBotPipelineDep = Annotated[CXoneBotPipeline, Depends(get_cxone_bot_pipeline)]


@router.post(
    "/webhook/cxone",
    response_model=BotExchangeResponse,
    response_model_exclude_none=True,
    responses={
        401: error_response(
            "Authorization header missing or not one of CXONE_WEBHOOK_AUTHORIZATION", HTTPError
        ),
        413: error_response("body over MAX_BODY_BYTES", HTTPError),
        415: error_response("not application/json, text/json or application/*+json", HTTPError),
        422: error_response("malformed ExternalIntegrationBotExchangeRequest", ValidationErrorBody),
    },
    openapi_extra=json_request_body(ExternalIntegrationBotExchangeRequest),
)
async def cxone_exchange(
    request: Request,
    principal: CXoneCallerDep,
    settings: SettingsDep,
    pipeline: CXoneBotPipelineDep,
) -> JSONResponse:
    if not _is_json(request.headers.get("content-type", "")):  # before the body is read
        raise HTTPException(
            415, "send the exchange as application/json, text/json or application/*+json"
        )
    body = await read_limited_body(request, settings.max_body_bytes)
    exchange = parse_body(ExternalIntegrationBotExchangeRequest, body)

    session = pipeline.codec.decode(exchange.botSessionState)
    if session.rejected not in ("", "missing"):
        BOT_STATE_REJECTED.labels(session.rejected).inc()
    deadline = Deadline.after(settings.cxone_deadline_seconds)
    turn = BotTurn(request_id=request_id_var.get())
    try:
        response = await asyncio.wait_for(
            pipeline.exchange(exchange, session, principal, deadline, turn),
            timeout=deadline.remaining(),
        )
    except TimeoutError:
        response = pipeline.failure(
            session, turn, f"no answer within {settings.cxone_deadline_seconds}s"
        )
    _observe(turn, exchange, response, session.session_id, principal.tenant)
    return JSONResponse(response.wire())


def _observe(
    turn: BotTurn,
    exchange: ExternalIntegrationBotExchangeRequest,
    response: BotExchangeResponse,
    session_id: str,
    tenant: str,
) -> None:
    result = turn.result
    provider, model = turn.provider or "", turn.model or ""
    TURNS.labels("cxone", turn.outcome).inc()  # tokens, cost and TTFT: metering and the router
    if turn.outcome in FALLBACKS:
        note_outcome("fallback", turn.outcome)
    else:  # a handoff or a reprompt is the bot doing its job
        note_outcome("success")
    extra: dict[str, Any] = {
        "surface": "cxone",
        "tenant": tenant,
        "session_id": session_id,
        "contact_id": exchange.contact_id,
        "input_type": exchange.input_type.value,
        "branch": response.branchName.value,
        "status": turn.outcome,  # named as on the other surfaces' turn lines
        "outcome": turn.outcome,
        "provider": provider or None,
        "model": model or None,
        "latency_ms": turn.elapsed_ms(),
        "ttft_ms": result.ttft_ms if result else None,
        "prompt_tokens": turn.usage.prompt_tokens,
        "completion_tokens": turn.usage.completion_tokens,
        "usage_estimated": turn.usage_estimated,
        "cost_usd": turn.cost,
        "cached": turn.cached,
        "dropped_turns": turn.dropped,
        "prompt_injection": list(turn.injection) or None,  # pattern names, never the text
        "redactions": turn.redactions or None,
        "reason": turn.reason or None,
    }
    log.info("cxone turn", extra=extra)
