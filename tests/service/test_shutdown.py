"""Graceful shutdown of the real service (`python -m app serve`, a subprocess) on SIGTERM.

The service runs against a loopback LLM upstream the test controls (the project's simulator with
a slow answer, or a socket that never answers). On SIGTERM it must stop accepting connections at
once, let the request in flight finish (its usage record in DATA_DIR's SQLite), close the ledger
and the store, and exit 0 within the grace period; a request that outlives the grace period is
cut, never waited on forever.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.settings import Settings
from app.simulator.faults import Fault, FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from app.store.audit import DB_FILENAME
from tests.helpers import free_port, service_env

pytestmark = pytest.mark.slow  # each test signals a service process

CLIENT_KEY = "ck-shutdown-key-5e1f"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
SLOW_ANSWER_SECONDS = 2.5
STARTUP_TIMEOUT = 30.0
# uvicorn's timeout_graceful_shutdown: SHUTDOWN_GRACE_SECONDS where that setting exists, else the
# fixed 20 s
GRACE_FIELD = "shutdown_grace_seconds"
CONFIGURABLE_GRACE = GRACE_FIELD in Settings.model_fields
DEFAULT_GRACE = 20


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    port: int
    grace: int
    data_dir: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        lines = self.stderr_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """`start_service(llm_url, grace, **env)`: the service on a free port, ready (`grace` is the
    shutdown grace asked for; the service's `grace` the one in force); always killed after."""
    started: list[Service] = []
    handles: list[Any] = []

    def start(llm_url: str, grace: int, **env: str) -> Service:
        data_dir = tmp_path / "data"
        data_dir.mkdir(exist_ok=True)
        port = free_port()
        environment = service_env(
            HOST="127.0.0.1",
            PORT=str(port),
            DATA_DIR=str(data_dir),
            LLM_GATEWAY_BASE_URL=llm_url,
            LLM_GATEWAY_API_KEY="sk-shutdown-provider-key",
            CLIENT_API_KEYS=f"{CLIENT_KEY}:acme",
            COGNIGY_WEBHOOK_SECRET="shutdown-webhook-secret",
            **env,
        )
        if CONFIGURABLE_GRACE:
            environment["SHUTDOWN_GRACE_SECONDS"] = str(grace)
        stderr_path = tmp_path / f"service-{port}.log"
        stderr = stderr_path.open("wb")
        handles.append(stderr)
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            cwd=tmp_path,  # no stray .env
            env=environment,
            stdout=stderr,
            stderr=stderr,
        )
        service = Service(
            process, port, grace if CONFIGURABLE_GRACE else DEFAULT_GRACE, data_dir, stderr_path
        )
        started.append(service)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"service exited early:\n{stderr_path.read_text()}")
            try:
                return httpx.get(f"{service.url}/health/live", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, STARTUP_TIMEOUT, "the service to start")
        return service

    yield start
    for service in started:
        if service.process.poll() is None:
            service.process.kill()
        service.process.wait(timeout=10)
    for handle in handles:
        handle.close()


def chat(service: Service, session: str, text: str, timeout: float) -> httpx.Response:
    body = {"session_id": session, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{service.url}/chat", json=body, headers=AUTH, timeout=timeout)


def ledger_rows(data_dir: Path, session: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data_dir / DB_FILENAME) as db:
        return db.execute(
            "SELECT tenant, surface, prompt_tokens, completion_tokens FROM usage_records "
            "WHERE session = ?",
            (session,),
        ).fetchall()


def test_sigterm_finishes_the_request_in_flight_records_it_and_exits_0(
    start_service: Callable[..., Service],
) -> None:
    plan = FaultPlan()
    with (
        LoopbackServer(create_llm_simulator(plan)) as llm,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        service = start_service(llm.url, grace=8)  # the slow answer fits in it
        plan.push(Fault(delay=SLOW_ANSWER_SECONDS))
        in_flight: Future[httpx.Response] = pool.submit(
            chat, service, "shutdown-1", "Where is my parcel?", 30.0
        )
        wait_until(lambda: bool(plan.requests), 10, "the upstream to receive the call")
        terminated = time.monotonic()
        service.terminate()

        wait_until(lambda: refuses_connections(service.port), 5, "new connections to be refused")
        assert not in_flight.done(), "the slow request should still be running"

        response = in_flight.result(timeout=30)
        assert response.status_code == 200, response.text
        assert "(simulated)" in response.json()["response"]
        assert response.headers["x-request-id"]

        returncode = service.process.wait(timeout=service.grace + 10)
        assert returncode == 0, service.stderr_path.read_text()
        assert time.monotonic() - terminated < SLOW_ANSWER_SECONDS + 5  # not the whole grace

    rows = ledger_rows(service.data_dir, "shutdown-1")
    assert len(rows) == 1, rows
    tenant, surface, prompt_tokens, completion_tokens = rows[0]
    assert (tenant, surface) == ("acme", "chat") and prompt_tokens > 0 and completion_tokens > 0
    logs = service.logs()
    messages = [e["message"] for e in logs]
    assert "cx-relay stopping" in messages
    assert not any("not written" in m for m in messages)
    (access,) = [e for e in logs if e["message"] == "request" and e.get("path") == "/chat"]
    assert access["status"] == 200 and access["request_id"] == response.headers["x-request-id"]


def test_a_request_outliving_the_grace_period_is_cut_and_the_process_still_exits(
    start_service: Callable[..., Service],
) -> None:
    """An upstream that accepts the connection and never answers: the service does not hang."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def hold_connections() -> None:  # accept and read, never answer
        silent.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = silent.accept()
                accepted.append(connection)
            except OSError:
                continue

    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        holder = threading.Thread(target=hold_connections, daemon=True)
        holder.start()
        service = start_service(
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            grace=2,
            LLM_TIMEOUT_SECONDS="120",
            CHAT_DEADLINE_SECONDS="600",
        )
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight: Future[httpx.Response] = pool.submit(
                chat, service, "shutdown-2", "Hello?", service.grace + 60
            )
            wait_until(lambda: bool(accepted), 10, "the upstream call to be made")
            terminated = time.monotonic()
            service.terminate()
            returncode = service.process.wait(timeout=service.grace + 10)
            waited = time.monotonic() - terminated
            assert returncode == 0, service.stderr_path.read_text()
            assert service.grace - 0.5 <= waited < service.grace + 5
            # cut, not answered: uvicorn sends a 500 when nothing was sent yet (or just closes)
            with contextlib.suppress(httpx.TransportError):
                assert in_flight.result(timeout=10).status_code == 500
        assert any("timeout graceful shutdown exceeded" in e["message"] for e in service.logs())
    finally:
        stop.set()
        silent.close()
        for connection in accepted:
            connection.close()
