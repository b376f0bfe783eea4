"""Probes. Liveness has no dependencies (a restart cures nothing a dependency breaks); readiness
takes the replica out of rotation while it cannot serve; `/health` is the operator's detail."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from app.deps import (
    HttpClientDep,
    ProvisionerDep,
    RouterSlotDep,
    StoreDep,
    parts_of,
)
from app.surfaces.health.probes import ProviderProbes
from app.surfaces.health.report import HealthOptions, health_report, readiness

router = APIRouter(tags=["health"])


async def get_health_options(connection: HTTPConnection) -> HealthOptions:
    part: HealthOptions = parts_of(connection).health
    return part


HealthOptionsDep = Annotated[HealthOptions, Depends(get_health_options)]


async def get_probes(connection: HTTPConnection) -> ProviderProbes:
    part: ProviderProbes = parts_of(connection).probes
    return part


ProbesDep = Annotated[ProviderProbes, Depends(get_probes)]


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/health/ready",
    responses={503: {"description": "not ready: out of rotation until it can serve"}},
)
async def ready(
    slot: RouterSlotDep, store: StoreDep, options: HealthOptionsDep, provisioner: ProvisionerDep
) -> JSONResponse:
    ok, body = await readiness(slot.current, store, options, provisioner.source)
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get(
    "/health", responses={503: {"description": "unhealthy: the report says which part failed"}}
)
async def health(
    slot: RouterSlotDep,
    store: StoreDep,
    options: HealthOptionsDep,
    provisioner: ProvisionerDep,
    http: HttpClientDep,
    probes: ProbesDep,
) -> JSONResponse:
    body: dict[str, Any] = await health_report(
        slot.current, store, options, provisioner.source, http, probes
    )
    return JSONResponse(body, status_code=503 if body["status"] == "unhealthy" else 200)
