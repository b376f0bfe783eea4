"""Scripted behaviour for the simulated upstreams: what the next requests should get.

The simulators answer realistically by default; a test, the benchmark or an operator trying
failure modes pushes faults (429 with Retry-After, 500, a delay, broken JSON ...) that the next
requests consume in order. Every request received is recorded for assertions.

Streamed requests (`stream: true`, and the WebSocket route) honour the same faults — an error
status is sent before any event, like a real provider — plus the streaming knobs: a slow first
token, a delay between chunks, exact chunks, and a stream cut after N chunks without its end
marker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response


@dataclass(frozen=True)
class Fault:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    content: str | None = None  # a well-formed chat completion carrying this content
    raw_body: str | None = None  # exactly this body (to break the wire format)
    json_body: dict[str, Any] | None = None  # this JSON body (e.g. an error object)
    # Streaming (SSE and WebSocket):
    first_token_delay: float = 0.0  # wait before the first content chunk (after the headers)
    chunk_delay: float = 0.0  # wait between content chunks
    cut_after: int | None = None  # end the stream after N content chunks, without its end marker
    chunks: list[str] | None = None  # exactly these content deltas (default: the content's words)
    reject_handshake: bool = False  # WebSocket: refuse the upgrade with `status` (no error frame)
    omit_usage: bool = False  # no usage anywhere in the answer (whole or streamed)
    finish_reason: str | None = None  # this finish reason instead of the natural one ("length")


class FaultPlan:
    """Thread-safe: the simulators run in their own server thread."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.events: list[str] = []  # what the simulator noticed, e.g. "ws-disconnect"

    def push(self, *faults: Fault) -> None:
        with self._lock:
            self._queue.extend(faults)

    def next(self) -> Fault | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def record(self, request: dict[str, Any]) -> None:
        """Keep what a request carried, and when it arrived (monotonic seconds)."""
        with self._lock:
            self.requests.append({**request, "at": time.monotonic()})

    def note(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.events.clear()


async def recorded_json(plan: FaultPlan, request: Request) -> Any:
    """The request's JSON body, recorded in the plan with the headers."""
    body = await request.json()
    plan.record({"body": body, "headers": dict(request.headers)})
    return body


async def fault_response(
    fault: Fault, error_body: Callable[[int], dict[str, Any]]
) -> Response | None:
    """After the fault's delay, the HTTP answer it scripts instead of the real one: its raw body,
    or its JSON body or error status (`error_body` gives the wire's own error for a status).
    None when the route answers as usual."""
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.raw_body is not None:
        return Response(fault.raw_body, fault.status, fault.headers, "application/json")
    if fault.json_body is not None or fault.status >= 400:
        error = fault.json_body or error_body(fault.status)
        return JSONResponse(error, fault.status, fault.headers)
    return None
