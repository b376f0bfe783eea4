"""bench/fake_upstream.py (the fast fake provider + CXone) with a latency and honest usage.

The benchmark's fake answers at once; a crash test wants calls *in flight* when the kill lands
(reserved, not yet settled), as with a real provider. Each answer is written after a delay drawn
uniformly from --latency-ms LO,HI; answers on one connection keep their order.

The benchmark's fake also reports the same usage (120 + 18 tokens) whatever it is asked, which
no provider does: it would bill more prompt tokens than the request has, and more completion
tokens than its max_tokens. Budgets rely on exactly that never happening (a settle exceeds its
reservation only when the provider uses more than prompt + max_tokens), so here the usage is
what OpenAI would report: the request's prompt counted with the same encoding, and the canned
answer's 18 tokens cut to max_tokens.

    python reliability/upstream.py --port 9100 --latency-ms 20,60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fake_upstream  # bench/ is not a package

from app.llm.tokens import estimate_tokens, preload

_CANNED_USAGE = fake_upstream._dumps(fake_upstream.USAGE)
_bench_route = fake_upstream.route


def honest_route(method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes) -> bytes:
    """The bench fake's answer, its usage replaced by what the request really amounts to."""
    answer = _bench_route(method, target, headers, body)
    if method != b"POST" or not target.split(b"?", 1)[0].endswith(b"/chat/completions"):
        return answer
    request = json.loads(body)
    completion = fake_upstream.USAGE["completion_tokens"]
    limit = request.get("max_completion_tokens") or request.get("max_tokens") or completion
    prompt = estimate_tokens(request["messages"], model=request.get("model"))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": min(completion, limit),
        "total_tokens": prompt + min(completion, limit),
    }
    head, _, payload = answer.partition(b"\r\n\r\n")
    payload = payload.replace(_CANNED_USAGE, fake_upstream._dumps(usage))
    head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(payload), head)
    return head + b"\r\n\r\n" + payload


class DelayedTransport:
    """Forwards to a transport, each write `delay()` seconds later, in order."""

    def __init__(self, transport: asyncio.Transport, low: float, high: float) -> None:
        self._transport = transport
        self._low, self._high = low, high
        self._loop = asyncio.get_running_loop()
        self._last = 0.0

    def _at(self) -> float:
        at = max(self._loop.time() + random.uniform(self._low, self._high), self._last)
        self._last = at
        return at

    def write(self, data: bytes) -> None:
        self._loop.call_at(self._at(), self._write, data)

    def _write(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._loop.call_at(self._at(), self._transport.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol_factory(low: float, high: float) -> type[fake_upstream.HTTPProtocol]:
    class Delayed(fake_upstream.HTTPProtocol):
        __slots__ = ()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = DelayedTransport(transport, low, high)  # type: ignore[assignment]

    return Delayed


async def main(port: int, low_ms: float, high_ms: float) -> None:
    preload(["gpt-4o-mini"])
    fake_upstream.route = honest_route  # the protocol looks the router up at every request
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        protocol_factory(low_ms / 1000, high_ms / 1000),
        "127.0.0.1",
        port,
        backlog=1024,
        reuse_address=True,
    )
    print(f"delayed fake upstream on :{port} ({low_ms}-{high_ms} ms)", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", default="20,60")
    args = parser.parse_args()
    low, _, high = args.latency_ms.partition(",")
    asyncio.run(main(args.port, float(low), float(high or low)))
