"""`python -m app serve`: one process, or WORKERS uvicorn worker processes.

`--simulate` (or SIMULATE=true) starts the simulated upstreams that are not configured here, once,
in this process, on loopback ports; the app reaches them like any real upstream, through the
settings (their URLs and credentials, and SIMULATED_UPSTREAMS for /health), so the app module
never imports the simulator.

With several workers each builds its own app (app.worker, imported by uvicorn) from the
environment, so the command line's overrides are put there first. Their metrics meet in
PROMETHEUS_MULTIPROC_DIR: prometheus-client reads that variable when it is first imported, which
in a worker is after the parent set it. The directory is wiped at start (a previous run's files
would add its counters to this run's); when it is not set, a temporary one is made and removed
at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from app.core.settings import Settings
from app.core.settings_loading import load_settings
from app.http.header_limits import HeaderLimits, bounded_http_protocol
from app.main import create_app
from app.observability.logs import configure_logging
from app.observability.metrics import MULTIPROC_ENV, forget_this_process, wipe_process_files

log = logging.getLogger("cxrelay")

# gpt-4o-mini's list prices (USD per 1,000 tokens), charged for the simulated model unless set.
SIMULATED_PRICES = {"llm_price_per_1k_prompt": 0.00015, "llm_price_per_1k_completion": 0.0006}
# text-embedding-3-small's, for the simulated embedding models.
SIMULATED_EMBEDDING_PRICE = {"llm_embedding_price_per_1k_input": 0.00002}


def prepare_metrics_dir(
    workers: int, environ: MutableMapping[str, str] | None = None
) -> tuple[Path | None, bool]:
    """The multiprocess metrics directory, wiped, and whether it is a temporary one of ours.
    None with one worker and no PROMETHEUS_MULTIPROC_DIR: the in-process registry serves."""
    env = os.environ if environ is None else environ
    configured = env.get(MULTIPROC_ENV)
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        wipe_process_files(path)
        return path, False
    if workers <= 1:
        return None, False
    path = Path(tempfile.mkdtemp(prefix="cx-relay-metrics-"))
    env[MULTIPROC_ENV] = str(path)
    return path, True


def start_simulators(settings: Settings, stack: ExitStack) -> dict[str, object]:
    """Serve the upstreams that are not configured from loopback servers (closed with `stack`);
    the settings that point the app at them."""
    from app.simulator.cxone import CXoneSimulatorState, create_cxone_simulator
    from app.simulator.llm import create_llm_simulator
    from app.simulator.server import LoopbackServer

    overrides: dict[str, object] = {}
    simulated: list[str] = []
    if not settings.llm_gateway_base_url:
        llm = stack.enter_context(LoopbackServer(create_llm_simulator()))
        overrides["llm_gateway_base_url"] = llm.url
        simulated.append("llm")
        if (
            settings.llm_price_per_1k_prompt is None
            and settings.llm_price_per_1k_completion is None
        ):
            overrides.update(SIMULATED_PRICES)  # so /budget/status shows costs in a demo
        if settings.llm_embedding_price_per_1k_input is None:
            overrides.update(SIMULATED_EMBEDDING_PRICE)
    if not settings.cxone_configured:
        state = CXoneSimulatorState()
        cxone = stack.enter_context(LoopbackServer(create_cxone_simulator(state)))
        overrides.update(
            cxone_client_id=state.client_id,
            cxone_client_secret=SecretStr(state.client_secret),
            cxone_access_key_id=state.access_key_id,
            cxone_access_key_secret=SecretStr(state.access_key_secret),
            cxone_token_url=f"{cxone.url}/auth/token",
            cxone_discovery_url=f"{cxone.url}/.well-known/cxone-configuration",
            cxone_api_base_url=None,
            cxone_tenant_id=None,
        )
        simulated.append("cxone")
    for name in simulated:
        log.warning(
            "SIMULATED %s upstream in use: answers do not come from a real service",
            name,
            extra={"simulated": name},
        )
    overrides["simulated_upstreams"] = simulated
    return overrides


def _environment_value(value: object) -> str:
    """A setting as the environment spells it (Settings parses it back)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | tuple):
        return ",".join(_environment_value(v) for v in value)
    return "" if value is None else str(value)  # blank: unset


def export_overrides(overrides: Mapping[str, object], environ: MutableMapping[str, str]) -> None:
    """The command line's settings, where a worker's load_settings() finds them."""
    for name, value in overrides.items():
        environ[name.upper()] = _environment_value(value)


@contextmanager
def exported(overrides: Mapping[str, object]) -> Iterator[None]:
    """export_overrides into this process's environment (which the workers inherit), undone
    after: the simulators' ports and credentials are this run's only."""
    saved = {name.upper(): os.environ.get(name.upper()) for name in overrides}
    export_overrides(overrides, os.environ)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def worker_app(settings: Settings | None = None) -> FastAPI:
    """One worker's app (built by app.worker, uvicorn's factory): settings from the environment,
    logging set up in this process, and its live gauges dropped from the aggregate when it
    exits."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)
    atexit.register(forget_this_process)
    return create_app(settings, owns_process=True)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """uvicorn handles SIGTERM with its graceful shutdown, then restores the previous handler and
    raises the signal again: exiting 0 here reports the clean stop (instead of a death by
    SIGTERM, status 143) and lets the `finally` below run. Before uvicorn starts, it stops the
    process at once."""
    raise SystemExit(0)


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the service, whether one process or WORKERS."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
        # a request's line and headers are bounded in size and in time before the app sees them
        "http": bounded_http_protocol(
            HeaderLimits(settings.max_header_bytes, settings.header_read_timeout_seconds)
        ),
        # a /ws/chat frame over the body limit is refused by the route; this keeps uvicorn from
        # reading a much larger one into memory first (the route answers 1009 up to this size)
        "ws_max_size": settings.max_body_bytes + 1024,
        # ASGI has no ping message: uvicorn pings, and closes with 1011 on a late pong
        "ws_ping_interval": settings.ws_ping_interval_seconds or None,
        "ws_ping_timeout": settings.ws_pong_timeout_seconds,
    }


def serve(settings: Settings, overrides: Mapping[str, object]) -> int:
    signal.signal(signal.SIGTERM, _exit_cleanly)
    options = server_options(settings)
    metrics_dir, temporary = prepare_metrics_dir(settings.workers)
    try:
        with ExitStack() as simulators:
            if settings.simulate:
                simulated = start_simulators(settings, simulators)
                settings = settings.model_copy(update=simulated)
                overrides = {**overrides, **simulated}
            if settings.workers == 1:
                uvicorn.run(create_app(settings, owns_process=True), **options)
            else:
                with exported(overrides):
                    uvicorn.run(
                        "app.worker:worker_app",
                        factory=True,
                        workers=settings.workers,
                        **options,
                    )
    finally:
        if temporary and metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
