"""/api/v2: the provisioning tutorial's gateway API (seed 002). Thin: authenticate, read the body,
call the GatewayService, map its outcome to the tutorial's statuses.

Provisioning is a right a key must be given: the admin token, or a client key (or access token)
whose scope list holds `gateway:write` (reads: also `provider:read` or `model:read`). A key
without a scope list, which reaches every chat route, does not reach these."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse

from app.core.principal import Principal
from app.core.scopes import GATEWAY_WRITE, MODEL_READ, PROVIDER_READ
from app.deps import GatewaysDep, SettingsDep
from app.http.body import read_limited_body
from app.http.caller import audit_actor, require_scope
from app.http.openapi import HTTPError, error_response
from app.http.problems import ProblemsResponse, problems_response
from app.llm.catalog import Problem
from app.llm.gateways import GatewayInvalid, GatewayNameTaken
from app.surfaces.provisioning.schemas import (
    GatewayCreated,
    GatewayView,
    HealthCheckView,
    ProviderOut,
)

log = logging.getLogger("cxrelay.gateways")


WriterDep = Annotated[Principal, Depends(require_scope(GATEWAY_WRITE, explicit=True))]
ReaderDep = Annotated[
    Principal, Depends(require_scope(GATEWAY_WRITE, PROVIDER_READ, MODEL_READ, explicit=True))
]

_AUTH: dict[int | str, dict[str, Any]] = {
    401: error_response("missing or unknown credential", HTTPError),
    403: error_response("the credential lacks the scope", HTTPError),
}
# `gw_` and 12 hex digits are given out; anything up to this length is looked up (404 if unknown)
GatewayId = Annotated[str, Path(min_length=1, max_length=64)]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: error_response("no such gateway", HTTPError)}
router = APIRouter(prefix="/api/v2", tags=["gateways (tutorial 002)"], responses=_AUTH)


@router.get("/providers", response_model=list[ProviderOut])
async def providers(gateways: GatewaysDep, _reader: ReaderDep) -> list[dict[str, Any]]:
    """The providers in service, their engine and each chat model's endpoint and limits."""
    return gateways.providers()


@router.post(
    "/gateways",
    status_code=201,
    response_model=GatewayCreated,
    responses={
        409: error_response("a gateway of that name exists", HTTPError),
        413: error_response("body over MAX_BODY_BYTES", HTTPError),
        415: error_response("body is not application/json", HTTPError),
        422: {"model": ProblemsResponse, "description": "every problem of the payload"},
    },
)
async def create(
    request: Request,
    response: Response,
    settings: SettingsDep,
    gateways: GatewaysDep,
    writer: WriterDep,
) -> GatewayCreated | JSONResponse:
    """Validated and stored `pending_validation`: nothing routes to it until its health check."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise HTTPException(415, f"send the gateway as application/json (got {media or 'none'})")
    body = await read_limited_body(request, settings.max_body_bytes)
    try:
        raw = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError is one
        problem = Problem("(root)", f"the body is not JSON: {error}")
        return problems_response(
            422, "the gateway payload is invalid; nothing was created", [problem]
        )
    try:
        record = await gateways.create(raw, audit_actor(writer))
    except GatewayInvalid as invalid:
        detail = "the gateway payload is invalid; nothing was created"
        return problems_response(422, detail, invalid.problems)
    except GatewayNameTaken as taken:
        raise HTTPException(409, str(taken)) from None
    response.headers["Location"] = f"/api/v2/gateways/{record.id}"
    return GatewayCreated.of(record)


@router.get("/gateways/{gateway_id}", response_model=GatewayView, responses=_NOT_FOUND)
async def status(gateway_id: GatewayId, gateways: GatewaysDep, _reader: ReaderDep) -> GatewayView:
    record = await gateways.get(gateway_id)
    if record is None:
        raise HTTPException(404, f"no gateway {gateway_id!r}")
    return GatewayView.of(record)


@router.post(
    "/gateways/{gateway_id}/health-check", response_model=HealthCheckView, responses=_NOT_FOUND
)
async def health_check(
    gateway_id: GatewayId, gateways: GatewaysDep, writer: WriterDep
) -> HealthCheckView:
    """Probe the gateway's endpoints with its key and, if they answer, serve it (`active`);
    else `failed` with the reasons. Answered when done (200), never left half-applied."""
    checked = await gateways.health_check(gateway_id, audit_actor(writer))
    if checked is None:
        raise HTTPException(404, f"no gateway {gateway_id!r}")
    view = GatewayView.of(checked.record)
    return HealthCheckView(**view.model_dump(), metrics=checked.metrics)
