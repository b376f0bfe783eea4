"""GET /metrics: the Prometheus text exposition of every cxrelay_* collector (every worker's,
added up, when there are several). Open, as Prometheus expects, unless METRICS_TOKEN is set."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from app.dependencies import ServicesDep
from app.routers.caller import record_auth_failure
from app.schemas.openapi import HTTPError, error_response
from app.services.metrics import exposition

router = APIRouter(tags=["operations"])
log = logging.getLogger("cxrelay.metrics")


async def require_scraper(request: Request, services: ServicesDep) -> None:
    """With METRICS_TOKEN set: Authorization: Bearer <METRICS_TOKEN>, compared in constant time
    over SHA-256 digests (neither content nor length leaks through timing), as the admin token."""
    token = services.settings.metrics_token
    secret = token.get_secret_value() if token is not None else ""
    if not secret:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        reason, message = "missing", "missing credential: send Authorization: Bearer <token>"
    elif hmac.compare_digest(
        hashlib.sha256(presented.encode()).digest(), hashlib.sha256(secret.encode()).digest()
    ):
        return
    else:
        reason, message = "invalid", "invalid metrics token"
    record_auth_failure(log, "metrics authentication failed", request, reason, message)
    raise HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_scraper)],
    responses={
        200: {
            "description": "the Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        401: error_response("METRICS_TOKEN is set: a missing or wrong bearer token", HTTPError),
    },
)
async def metrics() -> Response:
    body, content_type = await asyncio.to_thread(exposition)  # reads every worker's file
    return Response(body, media_type=content_type)
