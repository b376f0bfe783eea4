"""Probes. Liveness has no dependencies; `/health` says what the service runs against."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app import __version__
from app.dependencies import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, Any]:
    simulated = {name: on for name, on in services.simulated.items() if on}
    return {
        "status": "healthy",
        "version": __version__,
        "simulated": simulated,
        "warnings": [
            f"the {name} upstream is SIMULATED: answers are not from a real service"
            for name in simulated
        ],
    }
