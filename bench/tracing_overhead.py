"""What tracing costs a request: CPU per /v1/chat/completions call through the ASGI app.

    python bench/tracing_overhead.py [--before PATH] [--rounds 5] [--requests 400]

Starts bench/fake_upstream.py and a collector stand-in (a thread answering POST /v1/traces with
200), then, round after round, one process per variant, in turn so that a busy machine's drift
falls on every variant alike:

  * `before`  (with --before: a checkout of the code without tracing, e.g. `git worktree add
              /tmp/before main`): the service as it was;
  * `off`     this code, no OTEL_* variable: no tracing layer, no SDK;
  * `on`      this code, OTEL_EXPORTER_OTLP_ENDPOINT at the stand-in: every request traced
              (server span plus its steps), batched and exported over OTLP/HTTP in-process.

Each process builds the app (`create_app`, its real lifespan: client-key auth, budgets and the
SQLite ledger, metrics, token counting), warms up, then sends `--requests` sequential calls over
httpx's ASGITransport and reports its own CPU time (time.process_time: the app, the client, and
with tracing on the SDK's export thread; not the fake upstream) per request. The figure per
variant is the median over the rounds; the ratios compare each variant's with `off`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIENT_KEY = "bench-client-key"

# one variant's measurement, run as `python -c` in a process of its own (its `app` from
# sys.path[0]: this checkout, or --before's)
MEASURE = r"""
import asyncio, json, os, sys, time
sys.path.insert(0, os.environ["BENCH_ROOT"])
import httpx
from app.main import create_app
from app.core.settings_loading import load_settings

async def main() -> None:
    app = create_app(load_settings())
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}
    headers = {"Authorization": "Bearer " + os.environ["BENCH_KEY"]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            async def call() -> None:
                answer = await client.post("/v1/chat/completions", json=body, headers=headers)
                assert answer.status_code == 200, answer.text
            for _ in range(int(os.environ["BENCH_WARMUP"])):
                await call()
            n = int(os.environ["BENCH_REQUESTS"])
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(n):
                await call()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(json.dumps({"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6}))

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def collector() -> tuple[ThreadingHTTPServer, str]:
    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def measure(root: Path, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE],
        env=env,
        cwd=env["DATA_DIR"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{root}: {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="a checkout without tracing, to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()

    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sink, sink_url = collector()
    try:
        time.sleep(1.0)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
        base.update(
            {
                "LLM_GATEWAY_BASE_URL": f"http://127.0.0.1:{port}",
                "LLM_GATEWAY_API_KEY": "bench-provider-key",
                "CLIENT_API_KEYS": f"{CLIENT_KEY}:bench",
                "COGNIGY_WEBHOOK_SECRET": "bench-cognigy-secret",
                "CLIENT_RATE_LIMIT_RPM": "100000000",
                "SESSION_ID_SECRET": "bench-session-id-secret-0123456789",
                "BUDGET_SESSION_TOKENS": "1000000000",
                "LOG_LEVEL": "WARNING",
                "BENCH_KEY": CLIENT_KEY,
                "BENCH_REQUESTS": str(args.requests),
                "BENCH_WARMUP": str(args.warmup),
            }
        )
        variants: dict[str, tuple[Path, dict[str, str]]] = {}
        if args.before is not None:
            variants["before"] = (args.before.resolve(), {})
        variants["off"] = (ROOT, {})
        variants["on"] = (ROOT, {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url})
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for round_number in range(args.rounds):
            for name, (root, extra) in variants.items():
                with tempfile.TemporaryDirectory() as data_dir:
                    env = {**base, **extra, "BENCH_ROOT": str(root), "DATA_DIR": data_dir}
                    results[name].append(measure(root, env))
            print(
                f"round {round_number + 1}: "
                + ", ".join(f"{n} {r[-1]['cpu_us']:.0f} µs" for n, r in results.items()),
                file=sys.stderr,
            )
    finally:
        upstream.terminate()
        upstream.wait()
        sink.shutdown()

    cpu = {n: statistics.median(r["cpu_us"] for r in rs) for n, rs in results.items()}
    wall = {n: statistics.median(r["wall_us"] for r in rs) for n, rs in results.items()}
    print(f"CPU per /v1 request, median of {args.rounds} rounds x {args.requests} requests:")
    for name in variants:
        spread = [round(r["cpu_us"]) for r in results[name]]
        print(
            f"  {name:7} {cpu[name]:7.0f} µs CPU  {wall[name]:7.0f} µs wall"
            f"  ({cpu[name] / cpu['off']:.3f} x off)  rounds: {spread}"
        )


if __name__ == "__main__":
    main()
