"""GET /metrics: the Prometheus text exposition of every cxrelay_* collector (every worker's,
added up, when there are several). Open, as Prometheus expects, unless METRICS_TOKEN is set."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.core.errors import AuthenticationFailed
from app.deps import SettingsDep
from app.http.caller import bearer_failure, unauthorized
from app.http.openapi import HTTPError, error_response
from app.observability.metrics import exposition

router = APIRouter(tags=["operations"])
log = logging.getLogger("cxrelay.metrics")


async def require_scraper(request: Request, settings: SettingsDep) -> None:
    """With METRICS_TOKEN set: Authorization: Bearer <METRICS_TOKEN>, checked as the admin
    token is (bearer_failure)."""
    token = settings.metrics_token
    secret = token.get_secret_value() if token is not None else ""
    if not secret:
        return
    reason = bearer_failure(request, secret)
    if reason is None:
        return
    message = {
        "missing": "missing credential: send Authorization: Bearer <token>",
        "invalid": "invalid metrics token",
    }[reason]
    failure = AuthenticationFailed(message, reason)
    raise unauthorized(log, "metrics authentication failed", request, failure)


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
