"""Benchmark cx-relay's overhead and throughput against a fast fake upstream (`make bench`).

Starts bench/fake_upstream.py (an OpenAI-compatible provider and CXone on one port) and the
service (`python -m app serve`, one worker, SQLite store in a temporary DATA_DIR, the whole
pipeline on: client-key auth, budgets reserved and settled with an unlimited session limit,
token counting, metrics, INFO logs to a file; the intent cache off so every request goes
upstream), then measures, direct to the fake vs through the service:

  * /v1/chat/completions non-streaming at concurrency 1 and 50 (wrk): requests/s, p50, p99;
  * `stream: true` at concurrency 1 and 50 (bench/rawclient.py): first SSE event and last byte;
  * the signed Cognigy fallback webhook and the CXone webhook at concurrency 50 (wrk);
  * the service's peak RSS (VmHWM) and RSS growth over 10,000 new sessions.

Writes bench/results/latest.{json,md,png}. `--quick` is a ~1 minute smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import hmac
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import rawclient

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
WRK_DIR = BENCH / "wrk"
HOST = "127.0.0.1"

CLIENT_KEY = "bench-client-key"
COGNIGY_SECRET = "bench-cognigy-secret"
CXONE_AUTH = "Bearer bench-cxone-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")

CHAT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {
            "role": "user",
            "content": "Where is my order 123456? It was supposed to arrive yesterday.",
        }
    ],
    "max_tokens": 128,
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return int(answer.status), answer.read()


def wait_until_up(url: str, process: subprocess.Popen[bytes], what: str, log_file: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
            sys.exit(f"{what} exited with {process.returncode} before it was up:\n{tail}")
        try:
            if http_get(url, 1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} did not answer {url} within 60 s (log: {log_file})")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM in KiB from /proc."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def upstream_counts(port: int) -> dict[str, int]:
    return dict(json.loads(http_get(f"http://{HOST}:{port}/_counts")[1]))


# --- wrk -----------------------------------------------------------------------------------------


def run_wrk(
    url: str,
    script: str,
    connections: int,
    seconds: float,
    script_args: list[str],
    env: dict[str, str],
) -> dict[str, Any]:
    threads = 1 if connections == 1 else 2
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_DIR / script),
        url,
        "--",
        *script_args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            data["rps"] = round(data["requests"] / (data["duration_us"] / 1e6), 1)
            data["connections"], data["threads"] = connections, threads
            errors = {k: v for k, v in data["errors"].items() if v}
            if errors:
                log(f"  WARNING: wrk errors on {url}: {errors}")
            return data
    sys.exit(f"wrk printed no result for {url}:\n{done.stdout}\n{done.stderr}")


def wrk_summary(data: dict[str, Any]) -> str:
    lat = data["latency_us"]
    p50, p99 = lat["p50"] / 1000, lat["p99"] / 1000
    return f"{data['rps']:>9.1f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"


# --- the processes -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.seconds: float = args.seconds or (3.0 if self.quick else 10.0)
        self.tmp = Path(tempfile.mkdtemp(prefix="cx-relay-bench-"))
        self.up_port = free_port()
        self.svc_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.results: dict[str, Any] = {}
        self.run_id = time.strftime("%H%M%S")

    # processes

    def start_upstream(self) -> None:
        log_file = self.tmp / "fake_upstream.log"
        with log_file.open("wb") as out:
            self.upstream = subprocess.Popen(
                [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(self.up_port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(self.upstream)
        wait_until_up(
            f"http://{HOST}:{self.up_port}/health", self.upstream, "fake upstream", log_file
        )
        log(f"fake upstream pid {self.upstream.pid} on :{self.up_port}")

    def service_env(self) -> dict[str, str]:
        up = f"http://{HOST}:{self.up_port}"
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "HOST": HOST,
                "PORT": str(self.svc_port),
                "WORKERS": "1",
                "LOG_LEVEL": "INFO",
                "DATA_DIR": str(self.tmp / "data"),
                "STORE_BACKEND": "sqlite",
                "LLM_GATEWAY_BASE_URL": up,
                "LLM_GATEWAY_API_KEY": "bench-upstream-key",
                "LLM_MODEL": "gpt-4o-mini",
                "COGNIGY_WEBHOOK_SECRET": COGNIGY_SECRET,
                "CXONE_WEBHOOK_AUTHORIZATION": CXONE_AUTH,
                "CLIENT_API_KEYS": f"{CLIENT_KEY}:bench",
                "BOT_STATE_SECRET": "bench-bot-state-secret-0123456789abcdef",
                "CXONE_CLIENT_ID": "bench-client",
                "CXONE_CLIENT_SECRET": "bench-client-secret",
                "CXONE_ACCESS_KEY_ID": "bench-access-key",
                "CXONE_ACCESS_KEY_SECRET": "bench-access-secret",
                "CXONE_TOKEN_URL": f"{up}/auth/token",
                "CXONE_API_BASE_URL": up,
                # unlimited session limit: sessions are still reserved on and settled
                # (app/accounting/budget.py BudgetPolicy: "None means unlimited (still counted)")
                "BUDGET_SESSION_TOKENS": "none",
                "INTENT_CACHE_ENABLED": "false",
                # inbound limits on, but far above the load: their checks are measured, never hit
                "CLIENT_RATE_LIMIT_RPM": "100000000",
                "CLIENT_MAX_CONCURRENT_STREAMS": "100000",
            }
        )
        return env

    def start_service(self, extra_env: dict[str, str] | None = None, name: str = "service") -> None:
        (self.tmp / "data").mkdir(exist_ok=True)
        self.service_log = self.tmp / f"{name}.log"
        with self.service_log.open("wb") as out:
            # cwd is the temporary directory, so a developer's .env cannot leak into the run
            self.service = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app",
                    "serve",
                    "--host",
                    HOST,
                    "--port",
                    str(self.svc_port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.service_env(), **(extra_env or {})},
                cwd=self.tmp,
            )
        self.procs.append(self.service)
        wait_until_up(
            f"http://{HOST}:{self.svc_port}/health/live", self.service, "service", self.service_log
        )
        log(f"service pid {self.service.pid} on :{self.svc_port} (log {self.service_log})")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                proc.kill()

    # requests

    def cognigy_body(self, i: int) -> tuple[str, bytes]:
        body = json.dumps(
            {
                "conversationId": f"bench-{self.run_id}-{i}",
                "userId": f"u-{i}",
                "lastMessage": "Where is my order 123456?",
                "confidenceScore": 0.42,
                "detectedIntent": "billing",
            },
            separators=(",", ":"),
        ).encode()
        return hmac.new(COGNIGY_SECRET.encode(), body, hashlib.sha256).hexdigest(), body

    def write_cognigy_bodies(self, count: int) -> Path:
        path = self.tmp / "cognigy_bodies.tsv"
        with path.open("wb") as out:
            for i in range(count):
                sig, body = self.cognigy_body(i)
                out.write(sig.encode() + b"\t" + body + b"\n")
        return path

    def sanity(self) -> None:
        """One request per surface: the answers the load phases rely on really are successes."""

        async def check() -> dict[str, Any]:
            conn = rawclient.Connection(HOST, self.svc_port)
            chat_headers = {
                "Content-Type": "application/json",
                "Authorization": f"Bearer {CLIENT_KEY}",
            }
            found: dict[str, Any] = {}
            t = await conn.request(
                "POST", "/v1/chat/completions", chat_headers, json.dumps(CHAT_BODY).encode()
            )
            answer = json.loads(t.body)
            found["chat"] = t.status == 200 and answer["choices"][0]["message"]["content"] != ""
            stream_body = json.dumps({**CHAT_BODY, "stream": True}).encode()
            t = await conn.request("POST", "/v1/chat/completions", chat_headers, stream_body)
            found["chat_stream"] = t.status == 200 and b"data: [DONE]" in t.body
            sig, body = self.cognigy_body(10**9)
            headers = {"Content-Type": "application/json", "X-Webhook-Signature": f"sha256={sig}"}
            t = await conn.request("POST", "/webhook/cognigy/fallback", headers, body)
            answer = json.loads(t.body)
            found["cognigy"] = (
                t.status == 200
                and answer.get("status") == "success"
                and answer.get("context") == "available"
            )
            if not found["cognigy"]:
                found["cognigy_answer"] = answer
            headers = {"Content-Type": "application/json", "Authorization": CXONE_AUTH}
            body = json.dumps(
                {
                    "userInput": "Hi, I was charged twice for my last order",
                    "userInputType": "TEXT",
                    "executionInfo": {"contactId": 999_999_999},
                    "mediaType": "chat",
                }
            ).encode()
            t = await conn.request("POST", "/webhook/cxone", headers, body)
            answer = json.loads(t.body)
            found["cxone"] = (
                t.status == 200 and answer.get("branchName") == "PromptAndCollectNextResponse"
            )
            if not found["cxone"]:
                found["cxone_answer"] = answer
            await conn.close()
            return found

        found = asyncio.run(check())
        self.results["sanity"] = found
        failed = [k for k in ("chat", "chat_stream", "cognigy", "cxone") if not found[k]]
        if failed:
            log(f"SANITY FAILED for {failed}: {json.dumps(found)[:2000]}")
            log(f"service log tail:\n{self.service_log.read_text(errors='replace')[-3000:]}")
            sys.exit(1)
        log("sanity: every surface answers a success")

    # phases

    def measured_wrk(
        self, url: str, script: str, connections: int, args: list[str], env: dict[str, str]
    ) -> dict[str, Any]:
        """wrk against a URL, plus the CPU the service and the fake used meanwhile and how many
        upstream calls the fake saw."""
        before_counts = upstream_counts(self.up_port)
        cpu_svc, cpu_up = cpu_seconds(self.service.pid), cpu_seconds(self.upstream.pid)
        data = run_wrk(url, script, connections, self.seconds, args, env)
        cpu_svc = cpu_seconds(self.service.pid) - cpu_svc
        cpu_up = cpu_seconds(self.upstream.pid) - cpu_up
        after = upstream_counts(self.up_port)
        data["upstream_calls"] = {
            k: after.get(k, 0) - before_counts.get(k, 0)
            for k in after
            if after.get(k, 0) - before_counts.get(k, 0)
        }
        data["cpu_ms_per_request"] = {
            "service": round(1000 * cpu_svc / max(1, data["requests"]), 3),
            "fake_upstream": round(1000 * cpu_up / max(1, data["requests"]), 3),
        }
        return data

    def phase_chat(self) -> None:
        env = {"BENCH_CLIENT_KEY": CLIENT_KEY}
        direct = f"http://{HOST}:{self.up_port}/v1/chat/completions"
        service = f"http://{HOST}:{self.svc_port}/v1/chat/completions"
        out: dict[str, Any] = {}
        for c in (1, 50):
            d = self.measured_wrk(direct, "chat.lua", c, [f"d{self.run_id}c{c}"], env)
            log(f"chat  c={c:<2} direct : {wrk_summary(d)}")
            s = self.measured_wrk(service, "chat.lua", c, [f"s{self.run_id}c{c}"], env)
            log(f"chat  c={c:<2} service: {wrk_summary(s)}")
            out[f"c{c}"] = {"direct": d, "service": s, "compare": compare(d, s)}
        self.results["chat"] = out

    def phase_stream(self) -> None:
        sequential = 200 if self.quick else 500
        per_conn = 10 if self.quick else 20
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}
        prefix = f"st{self.run_id}"

        def make(kind: str) -> Any:
            body = json.dumps({**CHAT_BODY, "stream": True}).encode()

            def build(i: int) -> tuple[dict[str, str], bytes]:
                return {**headers, "X-Session-Id": f"{prefix}-{kind}-{i}"}, body

            return build

        def ok(t: rawclient.Timing) -> bool:
            return t.status == 200 and t.body.rstrip().endswith(b"data: [DONE]")

        out: dict[str, Any] = {}
        for c, total in ((1, sequential), (50, 50 * per_conn)):
            row: dict[str, Any] = {}
            for where, port in (("direct", self.up_port), ("service", self.svc_port)):
                summary = asyncio.run(
                    rawclient.drive(
                        HOST, port, "/v1/chat/completions", make(f"{where}{c}"), total, c, ok
                    )
                )
                row[where] = summary.as_dict()
                r = row[where]
                log(
                    f"stream c={c:<2} {where:<7}: {r['rps']:>9.1f} str/s  "
                    f"first event p50 {r['ttfb_p50_us'] / 1000:6.2f} ms p99 "
                    f"{r['ttfb_p99_us'] / 1000:6.2f} ms  last byte p50 "
                    f"{r['ttlb_p50_us'] / 1000:6.2f} ms p99 {r['ttlb_p99_us'] / 1000:6.2f} ms"
                    + (f"  ERRORS {r['errors']}" if r["errors"] else "")
                )
            d, s = row["direct"], row["service"]
            row["compare"] = {
                key: {
                    "overhead_us": round(s[key] - d[key], 1),
                    "ratio": round(s[key] / d[key], 1) if d[key] else None,
                }
                for key in ("ttfb_p50_us", "ttfb_p99_us", "ttlb_p50_us", "ttlb_p99_us")
            }
            out[f"c{c}"] = row
        self.results["stream"] = out

    def phase_webhooks(self) -> None:
        threads = 2
        bodies = self.write_cognigy_bodies(20_000 if self.quick else 60_000)
        env = {"BENCH_COGNIGY_FILE": str(bodies), "BENCH_CXONE_AUTH": CXONE_AUTH}
        out: dict[str, Any] = {}
        url = f"http://{HOST}:{self.svc_port}/webhook/cognigy/fallback"
        data = self.measured_wrk(url, "cognigy.lua", 50, [str(threads)], env)
        log(f"cognigy c=50 service: {wrk_summary(data)}")
        out["cognigy_c50"] = data
        url = f"http://{HOST}:{self.svc_port}/webhook/cxone"
        base = str(int(time.time()) % 100_000 * 1_000_000_000)
        data = self.measured_wrk(url, "cxone.lua", 50, [base], env)
        log(f"cxone   c=50 service: {wrk_summary(data)}")
        out["cxone_c50"] = data
        self.results["webhooks"] = out

    def phase_sessions(self) -> None:
        """RSS growth over N new sessions (distinct X-Session-Id on /v1/chat/completions, each
        reserving and settling its own session budget row), measured on the live service."""
        count = 2_000 if self.quick else 10_000
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}
        body = json.dumps(CHAT_BODY).encode()
        prefix = f"mem{self.run_id}"

        def make(i: int) -> tuple[dict[str, str], bytes]:
            return {**headers, "X-Session-Id": f"{prefix}-{i}"}, body

        time.sleep(1.0)  # the ledger's batched writes settle
        before = proc_status(self.service.pid)
        summary = asyncio.run(
            rawclient.drive(HOST, self.svc_port, "/v1/chat/completions", make, count, 50)
        )
        time.sleep(1.0)
        after = proc_status(self.service.pid)
        delta_kib = after["VmRSS"] - before["VmRSS"]
        self.results["sessions"] = {
            "method": (
                f"live service: VmRSS before/after driving {count} requests with distinct "
                "X-Session-Id through /v1/chat/completions (c=50), after all other phases"
            ),
            "sessions": count,
            "errors": summary.errors,
            "rss_before_kib": before["VmRSS"],
            "rss_after_kib": after["VmRSS"],
            "rss_delta_kib": delta_kib,
            "bytes_per_session": round(delta_kib * 1024 / count, 1),
            "note": "VmRSS moves in pages and the allocator reuses freed memory, so a result "
            "within about +-1 MiB / sessions is noise: the service keeps no per-session state "
            "in memory on this path (budgets live in SQLite)",
        }
        log(
            f"sessions: {count} new sessions, RSS {before['VmRSS'] / 1024:.1f} -> "
            f"{after['VmRSS'] / 1024:.1f} MiB ({delta_kib * 1024 / count:.0f} B/session)"
        )

    def upstream_alone(self) -> None:
        """The fake's own throughput, wrk straight at it (no service running load meanwhile)."""
        url = f"http://{HOST}:{self.up_port}/v1/chat/completions"
        env = {"BENCH_CLIENT_KEY": CLIENT_KEY}
        out = {}
        for c in (1, 50):
            out[f"c{c}"] = run_wrk(url, "chat.lua", c, self.seconds / 2, ["u"], env)
            log(f"fake upstream alone c={c:<2}: {wrk_summary(out[f'c{c}'])}")
        self.results["fake_upstream"] = out

    def warm_up(self) -> None:
        env = {
            "BENCH_CLIENT_KEY": CLIENT_KEY,
            "BENCH_CXONE_AUTH": CXONE_AUTH,
            "BENCH_COGNIGY_FILE": str(self.write_cognigy_bodies(2000)),
        }
        base = f"http://{HOST}:{self.svc_port}"
        secs = 2.0 if self.quick else 3.0
        run_wrk(f"{base}/v1/chat/completions", "chat.lua", 10, secs, [f"w{self.run_id}"], env)
        run_wrk(f"{base}/webhook/cognigy/fallback", "cognigy.lua", 10, secs, ["2"], env)
        run_wrk(f"{base}/webhook/cxone", "cxone.lua", 10, secs, ["7"], env)
        log("warmed up")

    def memory_without_tokenizer(self) -> None:
        """Peak RSS of a second service with TOKEN_COUNTING=estimate (no o200k tables) after
        the same warm-up: what the exact tokenizer costs in memory."""
        self.service.send_signal(signal.SIGTERM)
        self.service.wait(timeout=25)
        self.start_service({"TOKEN_COUNTING": "estimate"}, name="service-estimate")
        self.warm_up()
        status = proc_status(self.service.pid)
        self.results["service_memory"]["estimate_peak_rss_kib"] = status["VmHWM"]
        log(f"TOKEN_COUNTING=estimate: peak RSS {status['VmHWM'] / 1024:.1f} MiB")

    def run(self) -> None:
        started = time.monotonic()
        self.start_upstream()
        self.upstream_alone()
        self.start_service()
        self.rss_at_start = proc_status(self.service.pid)["VmRSS"]
        self.sanity()
        self.warm_up()
        self.phase_chat()
        self.phase_stream()
        self.phase_webhooks()
        self.phase_sessions()
        status = proc_status(self.service.pid)
        self.results["service_memory"] = {
            "peak_rss_kib": status["VmHWM"],
            "final_rss_kib": status["VmRSS"],
            "rss_at_start_kib": self.rss_at_start,
        }
        log(f"service peak RSS (VmHWM) {status['VmHWM'] / 1024:.1f} MiB")
        self.memory_without_tokenizer()
        self.results["meta"] = meta(self, time.monotonic() - started)


def compare(direct: dict[str, Any], service: dict[str, Any]) -> dict[str, Any]:
    d, s = direct["latency_us"], service["latency_us"]
    return {
        "p50_overhead_us": round(s["p50"] - d["p50"], 1),
        "p99_overhead_us": round(s["p99"] - d["p99"], 1),
        "p50_ratio": round(s["p50"] / d["p50"], 1) if d["p50"] else None,
        "p99_ratio": round(s["p99"] / d["p99"], 1) if d["p99"] else None,
        "throughput_ratio": round(direct["rps"] / service["rps"], 1) if service["rps"] else None,
    }


def meta(bench: Bench, elapsed: float) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        or subprocess.run(["wrk", "-v"], capture_output=True, text=True).stderr.split("\n")[0],
        "quick": bench.quick,
        "seconds_per_wrk_run": bench.seconds,
        "elapsed_seconds": round(elapsed, 1),
        "service": "python -m app serve, WORKERS=1, STORE_BACKEND=sqlite, "
        "INTENT_CACHE_ENABLED=false, BUDGET_SESSION_TOKENS=none (reserved+settled), "
        "LOG_LEVEL=INFO to a file",
        "note": "one run on a shared machine; wrk/the client, the fake and the service "
        "share the cores",
    }


# --- reports -------------------------------------------------------------------------------------


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def markdown(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [
        "# cx-relay benchmark",
        "",
        f"{m['date']} · nproc {m['nproc']} · Python {m['python']} · {m['wrk']} · "
        f"{'quick' if m['quick'] else 'full'} run ({m['seconds_per_wrk_run']:.0f} s per wrk run, "
        f"{m['elapsed_seconds']:.0f} s in all)",
        "",
        f"Service: {m['service']}. {m['note']}; medians of one run, treat ratios as the signal.",
        "",
        "## /v1/chat/completions, non-streaming (wrk)",
        "",
        "| concurrency | target | req/s | p50 ms | p99 ms | service CPU ms/req |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in ("c1", "c50"):
        for where in ("direct", "service"):
            x = r["chat"][c][where]
            cpu = x["cpu_ms_per_request"]["service"] if where == "service" else "-"
            lines.append(
                f"| {c[1:]} | {where} | {x['rps']:.0f} | {ms(x['latency_us']['p50'])} | "
                f"{ms(x['latency_us']['p99'])} | {cpu} |"
            )
        k = r["chat"][c]["compare"]
        lines.append(
            f"| {c[1:]} | **overhead** | /{k['throughput_ratio']} | "
            f"+{ms(k['p50_overhead_us'])} (x{k['p50_ratio']}) | "
            f"+{ms(k['p99_overhead_us'])} (x{k['p99_ratio']}) | |"
        )
    lines += [
        "",
        "## /v1/chat/completions, `stream: true` (bench/rawclient.py)",
        "",
        "First event = first `data:` SSE event received; last byte = end of the response.",
        "",
        "| concurrency | target | streams | streams/s | first event p50 ms | p99 ms "
        "| last byte p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in ("c1", "c50"):
        for where in ("direct", "service"):
            x = r["stream"][c][where]
            lines.append(
                f"| {c[1:]} | {where} | {x['requests']} | {x['rps']:.0f} | "
                f"{ms(x['ttfb_p50_us'])} | {ms(x['ttfb_p99_us'])} | "
                f"{ms(x['ttlb_p50_us'])} | {ms(x['ttlb_p99_us'])} |"
            )
        k = r["stream"][c]["compare"]
        lines.append(
            f"| {c[1:]} | **overhead** | | | +{ms(k['ttfb_p50_us']['overhead_us'])} "
            f"(x{k['ttfb_p50_us']['ratio']}) | +{ms(k['ttfb_p99_us']['overhead_us'])} | "
            f"+{ms(k['ttlb_p50_us']['overhead_us'])} (x{k['ttlb_p50_us']['ratio']}) | "
            f"+{ms(k['ttlb_p99_us']['overhead_us'])} |"
        )
    lines += [
        "",
        "## Webhooks through the service, concurrency 50 (wrk)",
        "",
        "| webhook | req/s | p50 ms | p99 ms | service CPU ms/req | upstream calls |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, key in (
        ("Cognigy fallback (HMAC, CXone history)", "cognigy_c50"),
        ("CXone bot turn", "cxone_c50"),
    ):
        x = r["webhooks"][key]
        calls = ", ".join(f"{k} {v}" for k, v in sorted(x["upstream_calls"].items()))
        lines.append(
            f"| {name} | {x['rps']:.0f} | {ms(x['latency_us']['p50'])} | "
            f"{ms(x['latency_us']['p99'])} | {x['cpu_ms_per_request']['service']} | "
            f"{x['requests']} requests → {calls} |"
        )
    fu = r["fake_upstream"]
    s = r["sessions"]
    mem = r["service_memory"]
    lines += [
        "",
        "## Memory",
        "",
        f"- Service peak RSS (VmHWM, whole run): **{mem['peak_rss_kib'] / 1024:.1f} MiB**"
        f" (final RSS {mem['final_rss_kib'] / 1024:.1f} MiB"
        + (
            f", RSS when /health/live first answered {mem['rss_at_start_kib'] / 1024:.1f} MiB"
            if "rss_at_start_kib" in mem
            else ""
        )
        + ")",
        *(
            [
                f"- With `TOKEN_COUNTING=estimate` (no tokenizer tables), after the same warm-up: "
                f"**{mem['estimate_peak_rss_kib'] / 1024:.1f} MiB** peak"
            ]
            if "estimate_peak_rss_kib" in mem
            else []
        ),
        f"- Per session: **{s['bytes_per_session']:.0f} bytes** "
        f"(RSS {s['rss_before_kib'] / 1024:.1f} → {s['rss_after_kib'] / 1024:.1f} MiB over "
        f"{s['sessions']} sessions; method: {s['method']}). {s.get('note', '')}",
        "",
        "## The fake upstream alone (wrk straight at it, before the service starts)",
        "",
        f"- c=1: {fu['c1']['rps']:.0f} req/s, p50 {ms(fu['c1']['latency_us']['p50'])} ms, "
        f"p99 {ms(fu['c1']['latency_us']['p99'])} ms",
        f"- c=50: {fu['c50']['rps']:.0f} req/s, p50 {ms(fu['c50']['latency_us']['p50'])} ms, "
        f"p99 {ms(fu['c50']['latency_us']['p99'])} ms",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("WARNING: matplotlib is not installed (pip install -e '.[ops]'): no latest.png")
        return
    fig, (lat_ax, rps_ax) = plt.subplots(1, 2, figsize=(13, 5))
    labels, direct, service = [], [], []
    for c in ("c1", "c50"):
        for q in ("p50", "p99"):
            labels.append(f"chat {c} {q}")
            direct.append(r["chat"][c]["direct"]["latency_us"][q] / 1000)
            service.append(r["chat"][c]["service"]["latency_us"][q] / 1000)
    for c in ("c1", "c50"):
        for key, name in (
            ("ttfb_p50_us", "1st ev p50"),
            ("ttlb_p50_us", "last p50"),
            ("ttlb_p99_us", "last p99"),
        ):
            labels.append(f"stream {c} {name}")
            direct.append(r["stream"][c]["direct"][key] / 1000)
            service.append(r["stream"][c]["service"][key] / 1000)
    xs = range(len(labels))
    lat_ax.bar([x - 0.2 for x in xs], direct, 0.4, label="direct to fake upstream")
    lat_ax.bar([x + 0.2 for x in xs], service, 0.4, label="through cx-relay")
    lat_ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("latency, ms (log)")
    lat_ax.set_title("Latency percentiles")
    lat_ax.legend()
    names = ["chat c1", "chat c50", "stream c1", "stream c50"]
    d_rps = [
        r["chat"]["c1"]["direct"]["rps"],
        r["chat"]["c50"]["direct"]["rps"],
        r["stream"]["c1"]["direct"]["rps"],
        r["stream"]["c50"]["direct"]["rps"],
    ]
    s_rps = [
        r["chat"]["c1"]["service"]["rps"],
        r["chat"]["c50"]["service"]["rps"],
        r["stream"]["c1"]["service"]["rps"],
        r["stream"]["c50"]["service"]["rps"],
    ]
    names += ["cognigy c50", "cxone c50"]
    d_rps += [0, 0]
    s_rps += [r["webhooks"]["cognigy_c50"]["rps"], r["webhooks"]["cxone_c50"]["rps"]]
    xs = range(len(names))
    rps_ax.bar([x - 0.2 for x in xs], d_rps, 0.4, label="direct to fake upstream")
    rps_ax.bar([x + 0.2 for x in xs], s_rps, 0.4, label="through cx-relay")
    rps_ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    rps_ax.set_yscale("log")
    rps_ax.set_ylabel("requests/s (log)")
    rps_ax.set_title("Throughput")
    rps_ax.legend()
    m = r["meta"]
    fig.suptitle(f"cx-relay overhead · {m['date']} · nproc {m['nproc']} · Python {m['python']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description="cx-relay overhead and throughput benchmark")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 10, quick 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print(
            "bench: `wrk` is not installed. Install it (Debian/Ubuntu: `sudo apt-get install wrk`,"
            " macOS: `brew install wrk`) and run `make bench` again.",
            file=sys.stderr,
        )
        return 2
    if not Path("/proc/self/status").exists():
        print("bench: needs Linux /proc (RSS and CPU readings)", file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(bench.results, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(bench.results))
    plot(bench.results, args.out / "latest.png")
    shutil.rmtree(bench.tmp, ignore_errors=True)
    log(f"wrote {args.out}/latest.json, latest.md, latest.png")
    print()
    print(markdown(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
