"""create_app(settings) and the lifespan that builds (app.bootstrap.parts) and closes the parts."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from app import __version__
from app.bootstrap.parts import build_parts
from app.core.heap import settle_startup_heap
from app.core.settings import Settings
from app.core.settings_loading import load_settings
from app.http.request_ids import RequestIdMiddleware
from app.http.request_metrics import RequestMetricsMiddleware
from app.observability import tracing
from app.observability.tracing_setup import excluded_urls, start_tracing, tracing_config
from app.surfaces.admin import keys as admin_keys
from app.surfaces.admin import router as admin
from app.surfaces.budget import metrics_router as gateway_metrics
from app.surfaces.budget import router as budget
from app.surfaces.chat import router as chat
from app.surfaces.chat import websocket as ws_chat
from app.surfaces.cognigy import router as cognigy
from app.surfaces.cxone import router as cxone
from app.surfaces.gateway import router as gateway
from app.surfaces.health import router as health
from app.surfaces.metrics import router as metrics
from app.surfaces.oauth import router as oauth
from app.surfaces.openai import embeddings_router as embeddings
from app.surfaces.openai import gateway_router as gateway_chat
from app.surfaces.openai import router as openai_compat
from app.surfaces.provisioning import router as provisioning_v2

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("cxrelay")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        await _start_tracing(app, stack)
        app.state.parts = await build_parts(app.state.settings, stack)
        if app.state.owns_process:
            settle_startup_heap()
        log.info(  # one line per process: with WORKERS > 1, each worker logs its own
            "cx-relay started",
            extra={
                "version": __version__,
                "started_at": datetime.now().isoformat(),
                **app.state.parts.health.startup,  # app.bootstrap.summary
            },
        )
        yield
        log.info("cx-relay stopping")


async def _start_tracing(app: FastAPI, stack: AsyncExitStack) -> None:
    """This process's tracer (with WORKERS > 1 each worker's own, built after the fork), stopped
    last: the parts' shutdown is still traced, then what is buffered is sent (SIGTERM too)."""
    provider = app.state.tracer_provider
    if provider is None:
        if app.state.tracing is None:
            return
        sdk_provider = start_tracing(app.state.tracing, __version__)
        stack.push_async_callback(asyncio.to_thread, sdk_provider.shutdown)
        provider = sdk_provider
    tracing.enable(provider.get_tracer("cx-relay", __version__))
    stack.callback(tracing.disable)


def _without_native_telemetry() -> dict[str, Any]:
    """FastAPI's built-in OpenTelemetry hooks (newer releases) look up the global providers on
    every request (~5% of a request's CPU, measured); the service has its own Prometheus metrics
    and JSON logs and configures no OpenTelemetry, so they are switched off where they exist."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(
    settings: Settings | None = None,
    *,
    owns_process: bool = False,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """`owns_process`: the serve command's app, the only one in its process, which may set
    process-wide state after start-up (app.core.heap). `tracer_provider`: trace into it (tests)
    instead of what the OTEL_* variables ask for (app.observability.tracing_setup)."""
    app = FastAPI(
        title="cx-relay",
        version=__version__,
        description="LLM webhook gateway for NICE Cognigy.AI and NICE CXone virtual agents",
        lifespan=lifespan,
        **_without_native_telemetry(),
    )
    app.state.settings = settings or load_settings()
    app.state.owns_process = owns_process
    app.state.tracer_provider = tracer_provider
    app.state.tracing = tracing_config() if tracer_provider is None else None
    app.add_middleware(RequestMetricsMiddleware)  # inner: the request id is set when it counts
    app.add_middleware(RequestIdMiddleware)
    if tracer_provider is not None or app.state.tracing is not None:
        from app.http.tracing import TracingMiddleware  # only then is OpenTelemetry imported

        # outermost: its span holds the whole request
        app.add_middleware(TracingMiddleware, excluded=excluded_urls())
    app.include_router(health.router)
    app.include_router(cognigy.router)
    app.include_router(cxone.router)
    app.include_router(admin.router)
    app.include_router(admin_keys.router)
    app.include_router(gateway.router)
    app.include_router(provisioning_v2.router)
    app.include_router(metrics.router)
    app.include_router(budget.router)
    app.include_router(chat.router)
    app.include_router(openai_compat.router)
    app.include_router(embeddings.router)
    app.include_router(ws_chat.router)
    app.include_router(oauth.router)
    app.include_router(gateway_chat.router)
    app.include_router(gateway_metrics.router)
    return app
