"""Request builders shared by the tests."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.auth.signatures import sign_hmac
from app.bootstrap.parts import Parts
from app.core.setting_names import names_of
from app.core.settings import Settings
from app.observability.logs import JsonFormatter
from app.observability.metrics import MULTIPROC_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent

SECRET = "test-webhook-secret"
API_KEY = "test-api-key-0123456789"
WEBHOOK = "/webhook/cognigy/fallback"
CXONE_AUTH = "Bearer cxone-test-token"
CXONE_WEBHOOK = "/webhook/cxone"
TEST_BASE_URL = "http://cx-relay.test"  # conftest's app_client


def parts(app: Any) -> Parts:
    """The shared parts a running app built (its lifespan), for a test to read. To replace one,
    use `app.dependency_overrides` with its app.deps function instead."""
    built: Parts = app.state.parts
    return built


def trigger(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "conversationId": "contact-42",
        "userId": "user-7",
        "lastMessage": "I was charged twice for my subscription",
        "confidenceScore": 0.41,
        "detectedIntent": "billing",
        "metadata": {"channel": "chat"},
    }
    body.update(fields)
    return body


def signed(body: dict[str, Any] | bytes, secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw, {"Content-Type": "application/json", "X-Webhook-Signature": sign_hmac(secret, raw)}


async def post_turn(
    client: httpx.AsyncClient, body: dict[str, Any] | bytes, **headers: str
) -> httpx.Response:
    raw, signed_headers = signed(body)
    return await client.post(WEBHOOK, content=raw, headers={**signed_headers, **headers})


async def cxone_turn(
    client: httpx.AsyncClient,
    user_input: str | None = "Where is my order?",
    input_type: str | int | None = "TEXT",
    state: object = None,
    **fields: Any,
) -> httpx.Response:
    """One Virtual Agent Hub exchange, as CXone sends it."""
    body: dict[str, Any] = {
        "virtualAgentId": "test-bot",
        "userInput": user_input,
        "userInputType": input_type,
        "executionInfo": {"contactId": 548712063, "busNo": 4599123, "requestId": 1},
        "botSessionState": state,
        "mediaType": "chat",
    }
    body.update(fields)
    headers = {"Authorization": CXONE_AUTH, "Content-Type": "application/json"}
    return await client.post(CXONE_WEBHOOK, json=body, headers=headers)


def websocket_gateway_and_backup(primary_url: str, backup_url: str) -> list[dict[str, Any]]:
    """Provider-file entries: "wsgw" streaming over a WebSocket (gpt-4o-mini), then "backup"
    over HTTP (gpt-4o); both take the key in $SIM_KEY."""
    return [
        {
            "name": "wsgw",
            "base_url": primary_url,
            "transport": "websocket",
            "api_keys": ["env:SIM_KEY"],
            "models": [{"name": "gpt-4o-mini"}],
        },
        {
            "name": "backup",
            "base_url": backup_url,
            "api_keys": ["env:SIM_KEY"],
            "models": [{"name": "gpt-4o"}],
        },
    ]


def service_env(**values: str) -> dict[str, str]:
    """For `python -m app` in a subprocess: the current environment without any setting of the
    service (nor a metrics directory of its own), the repository importable, plus `values`."""
    names = {
        env_name.upper()
        for name, field in Settings.model_fields.items()
        for env_name in names_of(field, name)  # the tutorials' names too
    } | {MULTIPROC_ENV}
    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in names and not k.startswith("OTEL_")  # tracing: off unless asked
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(values)
    return env


# Ports for what the tests start on their own (a service process, a redis-server, a proxy that
# must come back on the same port, a port nothing listens on). Not bind(("127.0.0.1", 0)) and
# close: that port is in the kernel's ephemeral range, where another xdist worker's bind(0) and
# every outgoing connection take theirs, so it can be taken again before the service binds it.
# Instead each worker of a run has a block of its own below the ephemeral range (32768 on Linux,
# 49152 elsewhere), offset by the run's id so two runs side by side seldom share one, and hands
# its ports out in turn (a port comes back 400 ports later, long after its TIME_WAIT).
PORT_BLOCKS_START = 20_000
PORT_BLOCK_SIZE = 400
PORT_BLOCKS = 30  # 20000-31999
_port_turn = itertools.count(random.randrange(PORT_BLOCK_SIZE))


def worker_id() -> str:
    """This pytest-xdist worker ("gw0", "gw1" …), or "main" without xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _port_block() -> int:
    worker = worker_id().removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    return (index + zlib.crc32(run.encode())) % PORT_BLOCKS


def free_port() -> int:
    """A loopback port nothing listens on now that no other worker of this run hands out."""
    first = PORT_BLOCKS_START + _port_block() * PORT_BLOCK_SIZE
    for _ in range(PORT_BLOCK_SIZE):
        port = first + next(_port_turn) % PORT_BLOCK_SIZE
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use (another run, a TIME_WAIT): the next one
                continue
        return port
    raise RuntimeError(f"no free port in {first}-{first + PORT_BLOCK_SIZE - 1}")


@dataclass
class ServiceProcess:
    """The service as its users run it: `python -m app …` in a process of its own."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@contextmanager
def running_service(
    home: Path, *args: str, startup_timeout: float = 60.0, **env: str
) -> Iterator[ServiceProcess]:
    """`python -m app serve <args>` on a free port with `env` (over service_env()), its working
    directory `home` (no stray .env), its output in home/service.log; yielded once /health/live
    answers, terminated (then killed) afterwards."""
    port = free_port()
    log_path = home / "service.log"
    environment = service_env(HOST="127.0.0.1", PORT=str(port), DATA_DIR=str(home), **env)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", *args],
            cwd=home,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        service = ServiceProcess(process, port, log_path)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                assert process.poll() is None, log_path.read_text()
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{service.url}/health/live").status_code == 200:
                        break
                assert time.monotonic() < deadline, f"not live: {log_path.read_text()}"
                time.sleep(0.05)
            yield service
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
@dataclass(frozen=True)
class ReadmeSamples:
    """The quick start's two requests, exactly as the README shows them."""

    cognigy_body: bytes  # $BODY, signed as `printf '%s' "$BODY" | openssl dgst -hmac <secret>`
    cognigy_secret: str
    cxone_authorization: str  # the curl's Authorization header value
    cxone_body: dict[str, Any]


def readme_samples() -> ReadmeSamples:
    """Read from the README itself, so a test that sends them fails when the README's commands
    stop working (not only when the code changes)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    body = re.search(r"^BODY='(.+)'$", quick_start, re.MULTILINE)
    secret = re.search(r"openssl dgst -sha256 -hmac (\S+)", quick_start)
    cxone = re.search(
        r"curl -s \S+/webhook/cxone \\\n\s*-H 'Authorization: ([^']+)'.*?-d '(\{.+?\})'",
        quick_start,
        re.DOTALL,
    )
    assert body and secret and cxone, "the README's quick start no longer has its samples"
    return ReadmeSamples(
        cognigy_body=body.group(1).encode(),
        cognigy_secret=secret.group(1),
        cxone_authorization=cxone.group(1),
        cxone_body=json.loads(cxone.group(2)),
    )
class Captured:
    """Every record every logger emits, formatted by the project's JsonFormatter."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        parsed = []
        for line in self.text.splitlines():
            entry = json.loads(line)  # every line is one JSON object
            assert isinstance(entry, dict), line
            parsed.append(entry)
        return parsed

    def with_message(self, message: str) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e["message"] == message]


@contextmanager
def capture_logs() -> Iterator[Captured]:
    """Everything the service logs, at every level (conftest's `captured` fixture)."""
    capture = Captured()
    handler = logging.StreamHandler(capture.stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    # the test's own clients log the URLs they call (and the openai client its requests); the
    # service's outbound calls stay captured
    handler.addFilter(
        lambda record: (
            TEST_BASE_URL not in record.getMessage() and not record.name.startswith("openai")
        )
    )
    root = logging.getLogger()
    saved_root = root.level
    # nothing may hide from the capture: undo any level or disabling another test configured
    saved = {
        name: (logger.level, logger.disabled)
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    for name in saved:
        logger = logging.getLogger(name)
        logger.setLevel(logging.NOTSET)
        logger.disabled = False
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for name, (level, disabled) in saved.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).disabled = disabled
