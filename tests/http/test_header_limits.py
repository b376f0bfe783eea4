"""Request heads bounded in size (MAX_HEADER_BYTES) and in time (HEADER_READ_TIMEOUT_SECONDS).

The service runs as `make run` and the image start it (`python -m app serve`, a subprocess, here
with --simulate) and is spoken to over plain sockets, byte by byte where the test needs to; the
h11 variant runs in uvicorn in a thread, with the options serve() builds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.sync.client import connect as websocket_connect

from app.auth.signatures import sign_hmac
from app.core.settings import DEV_CLIENT_API_KEY, DEV_WEBHOOK_SECRET, Settings
from app.http.header_limits import H11WithHeaderLimits, HeaderLimits, HttpToolsWithHeaderLimits
from app.main import create_app
from app.serving import server_options
from tests.helpers import ServiceProcess, running_service, trigger

LIMIT = 16384  # MAX_HEADER_BYTES' default: the services below leave it unset
HEAD_TIMEOUT = 1.0  # HEADER_READ_TIMEOUT_SECONDS of the services below
GIVE_UP = 15.0  # a connection still open this long after its head stalled is never closed
MiB = 1024 * 1024


@contextmanager
def _running_service(home: Path, **env: str) -> Iterator[ServiceProcess]:
    """`python -m app serve --simulate` with a 1 s header timeout, live."""
    with running_service(
        home,
        "--simulate",
        HEADER_READ_TIMEOUT_SECONDS=str(HEAD_TIMEOUT),
        TOKEN_COUNTING="estimate",  # starts sooner; nothing here counts tokens
        **env,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with _running_service(tmp_path_factory.mktemp("header-limits")) as running:
        yield running


# --- a client on a plain socket --------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP)


def head_of(size: int, path: str = "/health/live", *, close: bool = True) -> bytes:
    """A complete GET whose request line and headers are exactly `size` bytes."""
    connection = "Connection: close\r\n" if close else ""
    start = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{connection}X-Padding: ".encode()
    end = b"\r\n\r\n"
    head = start + b"p" * (size - len(start) - len(end)) + end
    assert len(head) == size
    return head


def read_until_closed(sock: socket.socket, timeout: float = GIVE_UP) -> bytes:
    """Everything the server sends until it closes (a reset after its answer included)."""
    received = b""
    sock.settimeout(timeout)
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while data := sock.recv(65536):
            received += data
    return received


def exchange(port: int, request: bytes) -> bytes:
    with _connect(port) as sock:
        sock.sendall(request)
        return read_until_closed(sock, timeout=5)


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response[9:12])


def body_of(response: bytes) -> Any:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def readable(sock: socket.socket, wait: float = 0.0) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def trickle_until_closed(sock: socket.socket, every: float = 1.0) -> bytes | None:
    """Send one more header byte each `every` seconds until the server answers or closes:
    what it sent, or None when it still had not after GIVE_UP seconds."""
    deadline = time.monotonic() + GIVE_UP
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"x")
        except OSError:  # closed already: what it answered is still to be read
            return read_until_closed(sock, timeout=5)
        if readable(sock, every):
            return read_until_closed(sock, timeout=5)
    return None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- size ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_64_mib_header_gets_431_and_is_not_read(service: ServiceProcess) -> None:
    rss_before = rss_bytes(service.process.pid)
    sent = 0
    with _connect(service.port) as sock:
        sock.settimeout(10)  # a server that stopped reading without closing fails the test
        started = time.monotonic()
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        piece = b"a" * 65536
        with contextlib.suppress(OSError):  # the server closed its end
            while sent < 64 * MiB and not readable(sock):
                sock.sendall(piece)
                sent += len(piece)
        response = read_until_closed(sock, timeout=10)
        elapsed = time.monotonic() - started

    assert status_of(response) == 431, response[:200]
    assert b"connection: close" in response
    assert body_of(response) == {
        "detail": f"request line and headers exceed the {LIMIT}-byte limit"
    }
    assert sent < 32 * MiB  # what the sockets' buffers took before the answer, not the header
    assert elapsed < 10
    assert rss_bytes(service.process.pid) - rss_before < 32 * MiB


@pytest.mark.slow
def test_a_head_of_exactly_the_limit_is_served_and_one_byte_more_gets_431(
    service: ServiceProcess,
) -> None:
    served = exchange(service.port, head_of(LIMIT))
    assert status_of(served) == 200, served[:200]
    refused = exchange(service.port, head_of(LIMIT + 1))
    assert status_of(refused) == 431, refused[:200]
    long_url = exchange(
        service.port, head_of(LIMIT + 1, path="/health/live?q=" + "u" * (LIMIT - 200))
    )
    assert status_of(long_url) == 431, long_url[:200]


@pytest.mark.slow
def test_an_http_client_sending_a_20_kb_cookie_reads_431(service: ServiceProcess) -> None:
    response = httpx.get(
        f"http://127.0.0.1:{service.port}/health/live",
        headers={"Cookie": "session=" + "c" * 20_000},
        timeout=10,
    )
    assert response.status_code == 431
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": f"request line and headers exceed the {LIMIT}-byte limit"}
    assert httpx.get(f"http://127.0.0.1:{service.port}/health/live").status_code == 200


# --- time ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_header_trickled_a_byte_a_second_gets_408_and_is_closed(service: ServiceProcess) -> None:
    started = time.monotonic()
    with _connect(service.port) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        response = trickle_until_closed(sock)
    elapsed = time.monotonic() - started

    assert response is not None, f"still open after {GIVE_UP} s"
    assert status_of(response) == 408, response[:200]
    assert body_of(response) == {"detail": "request headers not received within 1 s"}
    assert HEAD_TIMEOUT * 0.5 < elapsed < HEAD_TIMEOUT + 6


@pytest.mark.slow
def test_fifty_slow_connections_are_all_closed(service: ServiceProcess) -> None:
    """25 trickling a header and 25 that never send anything: none is kept."""
    trickling = [_connect(service.port) for _ in range(25)]
    silent = [_connect(service.port) for _ in range(25)]
    started = time.monotonic()
    for sock in trickling:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    received: dict[socket.socket, bytes] = {}
    try:
        while len(received) < 50 and time.monotonic() - started < GIVE_UP:
            for sock in trickling:
                if sock not in received:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"x")
            ready = select.select([s for s in trickling + silent if s not in received], [], [], 1)
            for sock in ready[0]:
                received[sock] = read_until_closed(sock, timeout=5)
        elapsed = time.monotonic() - started
    finally:
        for sock in trickling + silent:
            sock.close()

    assert len(received) == 50, f"{50 - len(received)} still open after {GIVE_UP} s"
    assert elapsed < HEAD_TIMEOUT + 8
    assert {status_of(received[sock]) for sock in trickling} == {408}
    assert {received[sock] for sock in silent} == {b""}  # closed, nothing to answer
    assert httpx.get(f"http://127.0.0.1:{service.port}/health/live").status_code == 200


@pytest.mark.slow
def test_each_keep_alive_request_has_its_own_head_time_and_the_idle_wait_is_not_it(
    service: ServiceProcess,
) -> None:
    client = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        client.request("GET", "/health/live")
        assert client.getresponse().read() and client.sock is not None
        time.sleep(HEAD_TIMEOUT * 2)  # idle on a keep-alive connection: uvicorn's 5 s, not ours
        client.request("GET", "/health/live")
        response = client.getresponse()
        assert response.status == 200
        response.read()
        assert client.sock is not None  # the same connection still
        client.sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        stalled = trickle_until_closed(client.sock)
    finally:
        client.close()
    assert stalled is not None, f"still open after {GIVE_UP} s"
    assert status_of(stalled) == 408


@pytest.mark.slow
def test_a_slow_body_after_a_prompt_head_is_not_timed(service: ServiceProcess) -> None:
    body = json.dumps(trigger()).encode()
    head = (
        "POST /webhook/cognigy/fallback HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"X-Webhook-Signature: {sign_hmac(DEV_WEBHOOK_SECRET, body)}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with _connect(service.port) as sock:
        sock.sendall(head)
        quarter = len(body) // 4 + 1
        for start in range(0, len(body), quarter):  # over 2.4 s, more than the head's 1 s
            time.sleep(HEAD_TIMEOUT * 0.6)
            sock.sendall(body[start : start + quarter])
        response = read_until_closed(sock)
    assert status_of(response) == 200, response[:300]
    assert body_of(response)["status"] == "success"


@pytest.mark.slow
def test_a_websocket_outlives_the_head_timeout(service: ServiceProcess) -> None:
    with websocket_connect(
        f"ws://127.0.0.1:{service.port}/ws/chat",
        additional_headers={"Authorization": f"Bearer {DEV_CLIENT_API_KEY}"},
        proxy=None,
    ) as ws:
        time.sleep(HEAD_TIMEOUT * 2.5)
        ws.send(json.dumps({"session_id": "s-1", "messages": [{"role": "user", "content": "hi"}]}))
        frames = []
        while not frames or frames[-1]["type"] == "content":
            frames.append(json.loads(ws.recv(timeout=10)))
    assert frames[-1]["type"] == "complete", frames[-1]


# --- several workers ----------------------------------------------------------------------------


@pytest.mark.slow
def test_with_two_workers_every_worker_bounds_heads(tmp_path: Path) -> None:
    with _running_service(tmp_path, WORKERS="2") as running:
        for _ in range(4):  # connections spread over both workers
            assert status_of(exchange(running.port, head_of(LIMIT))) == 200
            refused = exchange(running.port, head_of(LIMIT + 1))
            assert status_of(refused) == 431, refused[:200]
        with _connect(running.port) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            stalled = trickle_until_closed(sock)
    assert stalled is not None, f"still open after {GIVE_UP} s"
    assert status_of(stalled) == 408


# --- uvicorn's h11 protocol, and its httptools one, in a thread with serve()'s options --------


@contextmanager
def _in_thread(options: dict[str, Any], app: Any) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    options = {k: v for k, v in options.items() if k not in ("host", "port")}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)  # polling interval only
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.mark.parametrize("protocol", [H11WithHeaderLimits, HttpToolsWithHeaderLimits])
def test_each_uvicorn_protocol_bounds_heads_in_size_and_time(
    protocol: type[Any], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(header_read_timeout_seconds=HEAD_TIMEOUT)
    options = server_options(settings)
    limits = HeaderLimits(settings.max_header_bytes, settings.header_read_timeout_seconds)
    options["http"] = functools.partial(protocol, limits=limits)
    with _in_thread(options, create_app(settings)) as port:
        assert status_of(exchange(port, head_of(LIMIT))) == 200
        assert status_of(exchange(port, head_of(LIMIT + 1))) == 431
        # two heads in one write, more than the limit together: each is counted on its own
        pipelined = exchange(port, head_of(2000, close=False) + head_of(LIMIT))
        assert pipelined.count(b"HTTP/1.1 200 OK") == 2, pipelined[:300]
        with _connect(port) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\n")
            stalled = trickle_until_closed(sock)
    assert stalled is not None, f"still open after {GIVE_UP} s"
    assert status_of(stalled) == 408
