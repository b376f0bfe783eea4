"""POST /webhook/cxone: the Virtual Agent Hub custom exchange endpoint (thin: read, authenticate,
parse, run the turn inside its deadline, log, answer in CXone's shape). The pipeline meters every
call (budget and ledger) itself."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.deadline import Deadline
from app.dependencies import ServicesDep
from app.observability import request_id_var
from app.pipelines.cxone_reply import BotTurn
from app.principal import DEFAULT_TENANT, Principal
from app.request_metrics import note_outcome
from app.schemas.cxone import BotExchangeResponse, ExternalIntegrationBotExchangeRequest
from app.services.body import read_limited_body
from app.services.metrics import BOT_STATE_REJECTED, TURNS
from app.services.signatures import fingerprint

router = APIRouter(tags=["cxone"])
log = logging.getLogger("cxrelay.cxone")

JSON_TYPES = ("application/json", "text/json")
# Turn outcomes where the bot could not answer (a 200 all the same: CXone gets a valid branch).
FALLBACKS = frozenset({"fallback", "fallback_escalated", "budget_exhausted"})


def _is_json(content_type: str) -> bool:
    """application/json, text/json and application/*+json, as NICE's spec lists."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


def _authorized(presented: str, accepted: list[bytes]) -> bool:
    digest = hashlib.sha256(presented.encode()).digest()
    match = False
    for expected in accepted:  # no early exit: the time does not tell which value matched
        match |= hmac.compare_digest(expected, digest)
    return match


def _principal(presented: str, authenticated: bool) -> Principal:
    """CXone's Authorization names no tenant: budgets, cache and ledger use the default one."""
    if not authenticated:
        return Principal(DEFAULT_TENANT, "unauthenticated", "anonymous", "none")
    return Principal(DEFAULT_TENANT, fingerprint(presented), "webhook", "authorization")


@router.post(
    "/webhook/cxone",
    response_model=BotExchangeResponse,
    response_model_exclude_none=True,
    responses={
        401: {
            "description": "Authorization header missing or not one of CXONE_WEBHOOK_AUTHORIZATION"
        },
        413: {"description": "body over MAX_BODY_BYTES"},
        415: {"description": "not application/json, text/json or application/*+json"},
        422: {"description": "malformed ExternalIntegrationBotExchangeRequest"},
    },
)
async def cxone_exchange(request: Request, services: ServicesDep) -> JSONResponse:
    settings = services.settings
    accepted = services.cxone_authorizations
    if not accepted and not settings.allow_unauthenticated_webhooks:
        raise HTTPException(
            401, "the CXone webhook is disabled until CXONE_WEBHOOK_AUTHORIZATION is set"
        )
    presented = request.headers.get("authorization", "")
    if accepted and not _authorized(presented, accepted):
        log.warning(
            "webhook authentication failed",
            extra={
                "route": request.url.path,
                "reason": "authorization header not accepted",
                "remote": request.client.host if request.client else "",
            },
        )
        raise HTTPException(401, "Authorization header not accepted for this endpoint")
    if not _is_json(request.headers.get("content-type", "")):
        raise HTTPException(
            415, "send the exchange as application/json, text/json or application/*+json"
        )
    body = await read_limited_body(request, settings.max_body_bytes)
    try:
        exchange = ExternalIntegrationBotExchangeRequest.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None

    pipeline = services.cxone_bot
    principal = _principal(presented, bool(accepted))
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
    except asyncio.TimeoutError:
        response = pipeline.failure(
            session, turn, f"no answer within {settings.cxone_deadline_seconds}s"
        )
    _observe(turn, exchange, response, session.session_id)
    return JSONResponse(response.wire())


def _observe(
    turn: BotTurn,
    exchange: ExternalIntegrationBotExchangeRequest,
    response: BotExchangeResponse,
    session_id: str,
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
        "tenant": DEFAULT_TENANT,  # CXone's Authorization names no tenant (see _principal)
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
