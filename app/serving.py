"""`python -m app serve`: one process, or WORKERS uvicorn worker processes.

With several workers each builds its own app (`worker_app`, imported by uvicorn) from the
environment, so the command line's overrides are put there first. Their metrics meet in
PROMETHEUS_MULTIPROC_DIR: prometheus-client reads that variable when it is first imported, which
in a worker is after the parent set it. The directory is wiped at start (a previous run's files
would add its counters to this run's); when it is not set, a temporary one is made and removed
at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from app.core.settings import Settings
from app.core.settings_loading import load_settings
from app.http.header_limits import HeaderLimits, bounded_http_protocol
from app.main import create_app
from app.observability.logs import configure_logging
from app.observability.metrics import MULTIPROC_ENV, forget_this_process, wipe_process_files


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


def export_overrides(overrides: Mapping[str, object], environ: MutableMapping[str, str]) -> None:
    """The command line's settings, where a worker's load_settings() finds them."""
    for name, value in overrides.items():
        environ[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)


def worker_app() -> FastAPI:
    """One worker's app (uvicorn's factory): settings from the environment, logging set up in
    this process, and its live gauges dropped from the aggregate when it exits."""
    settings = load_settings()
    configure_logging(settings.log_level)
    atexit.register(forget_this_process)
    return create_app(settings)


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
        if settings.workers == 1:
            uvicorn.run(create_app(settings), **options)
        else:
            export_overrides(overrides, os.environ)
            uvicorn.run("app.serving:worker_app", factory=True, workers=settings.workers, **options)
    finally:
        if temporary and metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
