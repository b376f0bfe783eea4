"""A minimal asyncio HTTP/1.1 client for the benchmark (keep-alive, Content-Length or chunked
responses), timing the first SSE event and the last byte — what wrk cannot see.

Kept dependency-free and tiny so that its own cost stays well under the service's.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timing:
    status: int
    ttfb: float  # seconds from writing the request to the first `data:` event (or first byte)
    ttlb: float  # seconds to the response's last byte
    body: bytes


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = self.reader = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> Timing:
        if self.writer is None:
            await self._open()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        start = time.perf_counter()
        self.writer.write(head.encode() + body)
        reader = self.reader
        status_line = await reader.readline()
        first_byte = time.perf_counter()
        if not status_line:
            await self.close()
            raise ConnectionError("connection closed before a response")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = None, False, False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        parts: list[bytes] = []
        first_event: float | None = None
        if chunked:
            while True:
                size = int((await reader.readline()).split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readline()  # the empty trailer line
                    break
                data = await reader.readexactly(size + 2)
                if first_event is None and b"data:" in data:
                    first_event = time.perf_counter()
                parts.append(data[:-2])
        elif length is not None:
            remaining = length
            while remaining:
                data = await reader.read(min(remaining, 65536))
                if not data:
                    raise ConnectionError("connection closed mid-body")
                if first_event is None and b"data:" in data:
                    first_event = time.perf_counter()
                parts.append(data)
                remaining -= len(data)
        else:
            parts.append(await reader.read())
            close = True
        end = time.perf_counter()
        if close:
            await self.close()
        ttfb = (first_event or first_byte) - start
        return Timing(status, ttfb, end - start, b"".join(parts))


@dataclass
class Summary:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    ttfb: list[float] = field(default_factory=list)
    ttlb: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, float | int]:
        def pct(values: list[float], q: float) -> float:
            if not values:
                return float("nan")
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e6

        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "rps": round(self.requests / self.seconds, 1) if self.seconds else 0.0,
            "ttfb_p50_us": round(pct(self.ttfb, 50), 1),
            "ttfb_p99_us": round(pct(self.ttfb, 99), 1),
            "ttlb_p50_us": round(pct(self.ttlb, 50), 1),
            "ttlb_p99_us": round(pct(self.ttlb, 99), 1),
            "ttlb_mean_us": round(statistics.fmean(self.ttlb) * 1e6, 1) if self.ttlb else 0.0,
        }


async def drive(
    host: str,
    port: int,
    path: str,
    make: Callable[[int], tuple[dict[str, str], bytes]],
    total: int,
    concurrency: int,
    ok: Callable[[Timing], bool] = lambda t: t.status == 200,
) -> Summary:
    """Send `total` requests (request i built by make(i)) over `concurrency` keep-alive
    connections; time each one."""
    summary = Summary()
    counter = iter(range(total))

    async def worker() -> None:
        conn = Connection(host, port)
        try:
            for i in counter:
                headers, body = make(i)
                try:
                    timing = await conn.request("POST", path, headers, body)
                except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                    summary.errors += 1
                    await conn.close()
                    continue
                summary.requests += 1
                if not ok(timing):
                    summary.errors += 1
                summary.ttfb.append(timing.ttfb)
                summary.ttlb.append(timing.ttlb)
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    summary.seconds = time.perf_counter() - start
    return summary
