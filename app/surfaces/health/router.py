"""Probes. Liveness has no dependencies (a restart cures nothing a dependency breaks); readiness
takes the replica out of rotation while it cannot serve; `/health` is the operator's detail."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.dependencies import ServicesDep
from app.surfaces.health.probes import ProviderProbes
from app.surfaces.health.report import health_report, readiness

router = APIRouter(tags=["health"])


async def get_probes(request: Request, services: ServicesDep) -> ProviderProbes:
    """One probe cache per app, made on first use (no await in between: no race)."""
    probes: ProviderProbes | None = getattr(request.app.state, "health_probes", None)
    if probes is None:
        settings = services.settings
        probes = ProviderProbes(
            settings.health_cache_seconds, settings.health_probe_timeout_seconds
        )
        request.app.state.health_probes = probes
    return probes


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/health/ready",
    responses={503: {"description": "not ready: out of rotation until it can serve"}},
)
async def ready(services: ServicesDep) -> JSONResponse:
    ok, body = await readiness(
        services.llm.current, services.store, services.settings, services.provisioner.source
    )
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get(
    "/health", responses={503: {"description": "unhealthy: the report says which part failed"}}
)
async def health(
    services: ServicesDep, probes: Annotated[ProviderProbes, Depends(get_probes)]
) -> JSONResponse:
    body: dict[str, Any] = await health_report(
        services.llm.current,
        services.store,
        services.settings,
        services.provisioner.source,
        services.http,
        probes,
        services.simulated,
    )
    return JSONResponse(body, status_code=503 if body["status"] == "unhealthy" else 200)
