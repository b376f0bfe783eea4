"""Both simulated upstreams on one port, for `python -m app simulator` and docker-compose."""

from __future__ import annotations

from fastapi import FastAPI

from app.simulator.cxone import CXoneSimulatorState, create_cxone_simulator
from app.simulator.llm import create_llm_simulator


def create_combined_simulator(cxone_state: CXoneSimulatorState | None = None) -> FastAPI:
    """The LLM and CXone simulators' routes do not overlap, so one app can serve both."""
    app = FastAPI(title="cx-relay simulated upstreams", openapi_url=None)
    for part in (create_llm_simulator(), create_cxone_simulator(cxone_state)):
        app.router.routes.extend(part.router.routes)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "healthy", "simulated": "llm,cxone"}

    return app
