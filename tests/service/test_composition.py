"""The app module builds the service and nothing else: the simulators belong to the command that
asks for them (`serve --simulate`), and every shared part is built once, by the lifespan."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import BaseRoute

from app.core.settings import Settings
from app.main import create_app
from tests.helpers import service_env, worker_id


@pytest.mark.slow
def test_the_app_module_never_loads_the_simulator(tmp_path: Path) -> None:
    """In a fresh interpreter (this one has the simulators loaded by conftest): importing
    app.main and building an app, simulated settings and all, imports no app.simulator module."""
    script = textwrap.dedent(
        """
        import sys
        import app.main
        app.main.create_app()
        print(",".join(m for m in sys.modules if m.split(".")[:2] == ["app", "simulator"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # no .env
        env=service_env(SIMULATE="true"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def _dependency_calls(dependant: Dependant) -> Iterator[Callable[..., object]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _dependency_calls(sub)


def _api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute | APIWebSocketRoute]:
    """Every API route, also those behind `include_router` (newer FastAPI keeps an included
    router as one entry that holds the original router)."""
    for route in routes:
        if isinstance(route, APIRoute | APIWebSocketRoute):
            yield route
        included = getattr(route, "original_router", None) or route
        yield from _api_routes(getattr(included, "routes", []))


def _runs_on_the_event_loop(call: Callable[..., object]) -> bool:
    target = call if inspect.isroutine(call) else getattr(call, "__call__", call)  # noqa: B004
    return inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target)


def test_every_route_dependency_runs_on_the_event_loop(
    make_settings: Callable[..., Settings],
) -> None:
    """FastAPI runs a plain `def` dependency in the thread pool: for one that only hands out a
    part, that is a thread hop per request (~10% of the main thread's CPU under load, profiled).
    Every dependency of every route is an `async def` (or an object with one as `__call__`)."""
    app = create_app(make_settings())
    in_thread_pool = sorted(
        {
            f"{route.path}: {getattr(call, '__qualname__', call)}"
            for route in _api_routes(app.routes)
            for call in _dependency_calls(route.dependant)
            if not _runs_on_the_event_loop(call)
        }
    )
    assert in_thread_pool == []


@pytest.mark.slow
def test_only_the_serve_commands_app_settles_the_heap(tmp_path: Path) -> None:
    """The serve command's app freezes what start-up left and raises the young threshold
    (app.core.heap), once its parts are built; an app built elsewhere (a test run builds many in
    one process) leaves the collector as it found it."""
    script = textwrap.dedent(
        """
        import gc
        from fastapi.testclient import TestClient
        import app.main, app.serving
        with TestClient(app.main.create_app()):
            print(gc.get_freeze_count(), gc.get_threshold()[0])
        worker = app.serving.worker_app()  # what uvicorn's workers build
        with TestClient(worker):
            print(gc.get_freeze_count() > 1000, gc.get_threshold()[0])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=service_env(SIMULATE="true", DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["0 700", "True 7000"]


def _modules_after_start_up(tmp_path: Path, **values: str) -> set[str]:
    """The top-level modules a fresh service process holds once its lifespan has run."""
    script = textwrap.dedent(
        """
        import sys
        from fastapi.testclient import TestClient
        import app.main
        with TestClient(app.main.create_app()) as client:
            assert client.get("/health/live").status_code == 200
        print(",".join(sorted({m.split(".")[0] for m in sys.modules})))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # no .env
        env=service_env(
            DATA_DIR=str(tmp_path),
            LLM_GATEWAY_BASE_URL="http://127.0.0.1:9/v1",
            LLM_GATEWAY_API_KEY="sk-test",
            CLIENT_API_KEYS="client-key",
            COGNIGY_WEBHOOK_SECRET="cognigy-secret",
            **values,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.strip().splitlines()[-1].split(","))


@pytest.mark.slow
def test_a_service_on_sqlite_never_loads_the_redis_client(tmp_path: Path) -> None:
    """The Redis client costs ~7 MiB that the embedded default has no use for; on Redis, the
    store and the inbound limits' counters load it."""
    assert "redis" not in _modules_after_start_up(tmp_path, STORE_BACKEND="sqlite")
    on_redis = _modules_after_start_up(
        tmp_path,
        STORE_BACKEND="redis",
        REDIS_URL="redis://127.0.0.1:6379/0",
        REDIS_KEY_PREFIX=f"cxrelay-test-{worker_id()}-{uuid.uuid4().hex}:",
        SESSION_ID_SECRET="s" * 32,
    )
    assert "redis" in on_redis
