"""Benchmark cx-relay's overhead and throughput against a fast fake upstream (`make bench`).

Starts bench/fake_upstream.py (an OpenAI-compatible provider and CXone on one port) and the
service (`python -m app serve`, one worker, SQLite store in a temporary DATA_DIR, the whole
pipeline on: client-key auth, budgets reserved and settled with an unlimited session limit,
token counting, metrics, INFO logs to a file; the intent cache off so every request goes
upstream), and two bare forwarders (bench/forwarder.py: uvicorn + FastAPI + a lifespan-held
client making the same upstream calls and nothing else; `aiohttp`, the stack's ceiling, and
`httpx` over the aiohttp transport, the service's client). Then it measures, direct to the fake
vs through the service vs through each forwarder, one target under load at a time:

  * /v1/chat/completions non-streaming at concurrency 1 and 50 (wrk): requests/s, p50, p99;
  * `stream: true` at concurrency 1 and 50 (bench/rawclient.py): first SSE event and last byte;
  * the signed Cognigy fallback webhook and the CXone webhook at concurrency 50 (wrk);
  * the service's peak RSS (VmHWM) and RSS growth over 10,000 new sessions; the forwarders' peak.

Every service figure is also given against the aiohttp forwarder of the same run, and the
"Targets (issue 19)" section says which of the issue's goals the run meets.

Writes bench/results/latest.{json,md,png}. `--quick` is a ~1.5 minute smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

# the bare forwarders (bench/forwarder.py), by their name in the results; the first is the
# reference every service figure is compared with
FORWARDERS = ("forwarder_aiohttp", "forwarder_httpx")
REFERENCE = FORWARDERS[0]
TARGET_LABELS = {
    "direct": "direct",
    "service": "service",
    "forwarder_aiohttp": "forwarder (aiohttp)",
    "forwarder_httpx": "forwarder (httpx)",
}
# issue 19's goals, against the aiohttp forwarder measured in the same run
GOAL_RPS_PCT = 50.0  # at least this share of the forwarder's requests/s at c=50
GOAL_MULTIPLE = 2.0  # overhead / p99 at most this multiple of the forwarder's
GOAL_PEAK_RSS_MIB = 150.0
# a process not under test that uses more CPU than this during a measurement is reported
IDLE_CPU_WARN_MS = 200.0

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
    """utime + stime of a process and its live descendants (WORKERS>1: uvicorn's workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return own + sum(cpu_seconds(child) for child in child_pids(pid))


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def redis_answers(url: str) -> bool:
    """A PING over a plain socket (the bench needs no Redis client of its own)."""
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = rest.rpartition("@")[2].partition(":")
    try:
        with socket.create_connection((host or HOST, int(port or 6379)), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


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
        self.fwd_ports = {name: free_port() for name in FORWARDERS}
        self.procs: list[subprocess.Popen[bytes]] = []
        # the live processes by name ("fake_upstream", "service", the forwarders): their CPU is
        # read around every measurement
        self.named: dict[str, subprocess.Popen[bytes]] = {}
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
        self.named["fake_upstream"] = self.upstream
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
        self.named["service"] = self.service
        wait_until_up(
            f"http://{HOST}:{self.svc_port}/health/live", self.service, "service", self.service_log
        )
        log(f"service pid {self.service.pid} on :{self.svc_port} (log {self.service_log})")

    def start_forwarder(self, name: str) -> None:
        log_file = self.tmp / f"{name}.log"
        port = self.fwd_ports[name]
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}
        with log_file.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(BENCH / "forwarder.py"),
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--upstream",
                    f"http://{HOST}:{self.up_port}",
                    "--client",
                    name.removeprefix("forwarder_"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmp,
            )
        self.procs.append(proc)
        self.named[name] = proc
        wait_until_up(f"http://{HOST}:{port}/health", proc, name, log_file)
        self.results.setdefault("forwarders_memory", {})[name] = {
            "rss_at_start_kib": proc_status(proc.pid)["VmRSS"]
        }
        log(f"{name} pid {proc.pid} on :{port}")

    def port(self, target: str) -> int:
        if target == "direct":
            return self.up_port
        if target == "service":
            return self.svc_port
        return self.fwd_ports[target]

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(proc.pid) for name, proc in self.named.items()}

    def cpu_used(
        self, target: str, before: dict[str, float], requests: int, data: dict[str, Any]
    ) -> None:
        """Record into `data` the CPU each process used per request since `before`, the target's
        own (for `direct`, the fake's) and warn when a process not under test was busy."""
        after = self.cpu()
        used = {name: after[name] - before.get(name, after[name]) for name in after}
        data["cpu_ms_per_request"] = {
            name: round(1000 * seconds / max(1, requests), 3) for name, seconds in used.items()
        }
        own = "fake_upstream" if target == "direct" else target
        data["target_cpu_ms_per_request"] = data["cpu_ms_per_request"][own]
        for name, seconds in used.items():
            if name not in (own, "fake_upstream") and 1000 * seconds > IDLE_CPU_WARN_MS:
                log(f"  WARNING: {name} used {1000 * seconds:.0f} ms CPU while not under test")

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

    def forwarder_sanity(self, name: str) -> None:
        """One request per route of a forwarder: a success, and the upstream calls the service
        makes for the same surface."""
        expected = {
            "chat": {"chat": 1},
            "chat_stream": {"stream": 1},
            "cognigy": {"messages": 1, "chat_json": 1},
            "cxone": {"messages": 1, "stream": 1},
        }

        async def check() -> dict[str, Any]:
            conn = rawclient.Connection(HOST, self.fwd_ports[name])
            headers = {"Content-Type": "application/json"}
            cognigy = self.cognigy_body(10**9 + 1)[1]
            cxone = json.dumps(
                {"userInput": "Hi", "userInputType": "TEXT", "executionInfo": {"contactId": 9}}
            ).encode()
            requests = {
                "chat": ("/v1/chat/completions", json.dumps(CHAT_BODY).encode()),
                "chat_stream": (
                    "/v1/chat/completions",
                    json.dumps({**CHAT_BODY, "stream": True}).encode(),
                ),
                "cognigy": ("/webhook/cognigy/fallback", cognigy),
                "cxone": ("/webhook/cxone", cxone),
            }
            found: dict[str, Any] = {}
            for surface, (path, body) in requests.items():
                before = upstream_counts(self.up_port)
                t = await conn.request("POST", path, headers, body)
                after = upstream_counts(self.up_port)
                calls = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)}
                found[surface] = t.status == 200 and calls == expected[surface]
                if surface == "chat_stream":
                    found[surface] = found[surface] and b"data: [DONE]" in t.body
                if not found[surface]:
                    found[f"{surface}_answer"] = {"status": t.status, "calls": calls}
            await conn.close()
            return found

        found = asyncio.run(check())
        self.results.setdefault("sanity_forwarders", {})[name] = found
        failed = [k for k in expected if not found[k]]
        if failed:
            log(f"{name} SANITY FAILED for {failed}: {json.dumps(found)[:2000]}")
            sys.exit(1)
        log(f"{name} sanity: every route answers a success with the service's upstream calls")

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
        self,
        target: str,
        path: str,
        script: str,
        connections: int,
        args: list[str],
        env: dict[str, str],
    ) -> dict[str, Any]:
        """wrk against one target (only it and the fake take load), plus the CPU every process
        used meanwhile and how many upstream calls the fake saw."""
        time.sleep(0.3)  # whatever the previous target still had in hand settles
        url = f"http://{HOST}:{self.port(target)}{path}"
        before_counts = upstream_counts(self.up_port)
        before_cpu = self.cpu()
        data = run_wrk(url, script, connections, self.seconds, args, env)
        self.cpu_used(target, before_cpu, data["requests"], data)
        after = upstream_counts(self.up_port)
        data["upstream_calls"] = {
            k: after.get(k, 0) - before_counts.get(k, 0)
            for k in after
            if after.get(k, 0) - before_counts.get(k, 0)
        }
        return data

    def phase_chat(self) -> None:
        env = {"BENCH_CLIENT_KEY": CLIENT_KEY}
        out: dict[str, Any] = {}
        for c in (1, 50):
            row: dict[str, Any] = {}
            for target in ("direct", "service", *FORWARDERS):
                prefix = f"{target[0]}{target[-1]}{self.run_id}c{c}"
                row[target] = self.measured_wrk(
                    target, "/v1/chat/completions", "chat.lua", c, [prefix], env
                )
                log(f"chat  c={c:<2} {TARGET_LABELS[target]:<19}: {wrk_summary(row[target])}")
            d = row["direct"]
            row["compare"] = compare(d, row["service"])
            row["vs_forwarder"] = versus(row["service"], row[REFERENCE], d)
            row["httpx_vs_aiohttp_forwarder"] = versus(row[FORWARDERS[1]], row[REFERENCE], d)
            out[f"c{c}"] = row
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
            for target in ("direct", "service", *FORWARDERS):
                time.sleep(0.3)
                before_cpu = self.cpu()
                summary = asyncio.run(
                    rawclient.drive(
                        HOST,
                        self.port(target),
                        "/v1/chat/completions",
                        make(f"{target}{c}"),
                        total,
                        c,
                        ok,
                    )
                )
                row[target] = r = summary.as_dict()
                self.cpu_used(target, before_cpu, summary.requests, r)
                log(
                    f"stream c={c:<2} {TARGET_LABELS[target]:<19}: {r['rps']:>8.1f} str/s  "
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
            row["vs_forwarder"] = stream_versus(s, row[REFERENCE], d)
            row["httpx_vs_aiohttp_forwarder"] = stream_versus(row[FORWARDERS[1]], row[REFERENCE], d)
            out[f"c{c}"] = row
        self.results["stream"] = out

    def phase_webhooks(self) -> None:
        """Each webhook at c=50 through the service, then the same load through each forwarder
        (which makes the same upstream calls). The service gets the results' top-level keys."""
        threads = 2
        bodies = self.write_cognigy_bodies(20_000 if self.quick else 60_000)
        env = {"BENCH_COGNIGY_FILE": str(bodies), "BENCH_CXONE_AUTH": CXONE_AUTH}
        out: dict[str, Any] = {"forwarders": {}, "vs_forwarder": {}}
        base = int(time.time()) % 100_000 * 1_000_000_000
        for key, path, script in (
            ("cognigy_c50", "/webhook/cognigy/fallback", "cognigy.lua"),
            ("cxone_c50", "/webhook/cxone", "cxone.lua"),
        ):
            for i, target in enumerate(("service", *FORWARDERS)):
                args = [str(threads)] if script == "cognigy.lua" else [str(base + i * 10**8)]
                data = self.measured_wrk(target, path, script, 50, args, env)
                log(f"{key[:-4]:<7} c=50 {TARGET_LABELS[target]:<19}: {wrk_summary(data)}")
                if target == "service":
                    out[key] = data
                else:
                    out["forwarders"].setdefault(target, {})[key] = data
            out["vs_forwarder"][key] = versus(out[key], out["forwarders"][REFERENCE][key])
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

    def warm_up(self, target: str = "service") -> None:
        env = {
            "BENCH_CLIENT_KEY": CLIENT_KEY,
            "BENCH_CXONE_AUTH": CXONE_AUTH,
            "BENCH_COGNIGY_FILE": str(self.write_cognigy_bodies(2000)),
        }
        base = f"http://{HOST}:{self.port(target)}"
        secs = 2.0 if self.quick else 3.0
        run_wrk(f"{base}/v1/chat/completions", "chat.lua", 10, secs, [f"w{self.run_id}"], env)
        run_wrk(f"{base}/webhook/cognigy/fallback", "cognigy.lua", 10, secs, ["2"], env)
        run_wrk(f"{base}/webhook/cxone", "cxone.lua", 10, secs, ["7"], env)
        log(f"{target} warmed up")

    def phase_workers(self) -> None:
        """WORKERS=1 and WORKERS=2 on SQLite and on Redis (issue 19, item 4): /v1 non-streaming
        at c=50, two workers' req/s as a multiple of one's, and the CPU each process used per
        request, which tells what bounds the second worker on two shared cores."""
        redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
        env = {"BENCH_CLIENT_KEY": CLIENT_KEY}
        out: dict[str, Any] = {"redis_url": redis_url}
        for backend in ("sqlite", "redis"):
            if backend == "redis" and not redis_answers(redis_url):
                out[backend] = {"skipped": f"no Redis answered at {redis_url} (BENCH_REDIS_URL)"}
                log(f"workers: {out[backend]['skipped']}")
                continue
            rows: dict[str, Any] = {}
            for workers in (1, 2):
                extra = {"WORKERS": str(workers), "STORE_BACKEND": backend}
                if backend == "redis":
                    extra |= {
                        "REDIS_URL": redis_url,
                        "REDIS_KEY_PREFIX": f"cxrelay-bench-{self.run_id}:",
                    }
                self.restart_service(extra, name=f"service-{backend}-w{workers}")
                self.warm_up_chat()
                prefix = f"w{workers}{backend[0]}{self.run_id}"
                data = self.measured_wrk(
                    "service", "/v1/chat/completions", "chat.lua", 50, [prefix], env
                )
                rows[f"w{workers}"] = data
                log(f"workers {backend:<6} WORKERS={workers}: {wrk_summary(data)}")
            rows["two_to_one"] = _times(rows["w2"]["rps"], rows["w1"]["rps"])
            out[backend] = rows
        self.results["workers"] = out

    def restart_service(self, extra_env: dict[str, str], name: str) -> None:
        self.service.send_signal(signal.SIGTERM)
        self.service.wait(timeout=25)
        self.start_service(extra_env, name=name)

    def warm_up_chat(self) -> None:
        url = f"http://{HOST}:{self.svc_port}/v1/chat/completions"
        secs = 1.0 if self.quick else 2.0
        run_wrk(url, "chat.lua", 10, secs, [f"ww{self.run_id}"], {"BENCH_CLIENT_KEY": CLIENT_KEY})

    def memory_without_tokenizer(self) -> None:
        """Peak RSS of a second service with TOKEN_COUNTING=estimate (no o200k tables) after
        the same warm-up: what the exact tokenizer costs in memory."""
        self.restart_service({"TOKEN_COUNTING": "estimate"}, name="service-estimate")
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
        for name in FORWARDERS:
            self.start_forwarder(name)
        self.sanity()
        for name in FORWARDERS:
            self.forwarder_sanity(name)
        for target in ("service", *FORWARDERS):
            self.warm_up(target)
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
        for name in FORWARDERS:
            status = proc_status(self.named[name].pid)
            memory = self.results["forwarders_memory"][name]
            memory.update(peak_rss_kib=status["VmHWM"], final_rss_kib=status["VmRSS"])
            log(f"{name} peak RSS (VmHWM) {status['VmHWM'] / 1024:.1f} MiB")
        self.memory_without_tokenizer()
        self.phase_workers()
        self.results["targets"] = targets(self.results)
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


def _pct(value: float, reference: float) -> float | None:
    return round(100 * value / reference, 1) if reference else None


def _times(value: float, reference: float) -> float | None:
    """value as a multiple of reference; None when the reference is not positive (an overhead
    lost in the noise cannot be a yardstick)."""
    return round(value / reference, 2) if reference > 0 else None


def versus(
    x: dict[str, Any], ref: dict[str, Any], direct: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A wrk measurement against the reference forwarder's in the same run: its requests/s as a
    percentage of the forwarder's, its latencies as multiples of the forwarder's, and (given the
    direct measurement) its overhead over direct as a multiple of the forwarder's overhead."""
    xl, rl = x["latency_us"], ref["latency_us"]
    out: dict[str, Any] = {
        "rps_pct": _pct(x["rps"], ref["rps"]),
        "p50_ratio": _times(xl["p50"], rl["p50"]),
        "p99_ratio": _times(xl["p99"], rl["p99"]),
        "cpu_ratio": _times(x["target_cpu_ms_per_request"], ref["target_cpu_ms_per_request"]),
    }
    if direct is not None:
        dl = direct["latency_us"]
        for q in ("p50", "p99"):
            out[f"{q}_overhead_multiple"] = _times(xl[q] - dl[q], rl[q] - dl[q])
    return out


def stream_versus(x: dict[str, Any], ref: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    """The streaming counterpart of versus(): first event and last byte."""
    out: dict[str, Any] = {
        "rps_pct": _pct(x["rps"], ref["rps"]),
        "cpu_ratio": _times(x["target_cpu_ms_per_request"], ref["target_cpu_ms_per_request"]),
    }
    for key in ("ttfb_p50_us", "ttfb_p99_us", "ttlb_p50_us", "ttlb_p99_us"):
        name = key.removesuffix("_us")
        out[f"{name}_ratio"] = _times(x[key], ref[key])
        out[f"{name}_overhead_multiple"] = _times(x[key] - direct[key], ref[key] - direct[key])
    return out


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's goals, each with the run's figure (against the aiohttp forwarder of the run)."""
    chat, stream, hooks = r["chat"], r["stream"], r["webhooks"]["vs_forwarder"]
    shares = {  # requests/s at c=50 as a % of the forwarder's
        "/v1/chat/completions": chat["c50"]["vs_forwarder"]["rps_pct"],
        "Cognigy webhook": hooks["cognigy_c50"]["rps_pct"],
        "CXone webhook": hooks["cxone_c50"]["rps_pct"],
    }
    multiples = {  # as a multiple of the forwarder's
        "/v1 overhead over direct at c=1 (p50)": chat["c1"]["vs_forwarder"][
            "p50_overhead_multiple"
        ],
        "streaming first-event overhead over direct at c=1 (p50)": stream["c1"]["vs_forwarder"][
            "ttfb_p50_overhead_multiple"
        ],
        "/v1 p99 at c=50": chat["c50"]["vs_forwarder"]["p99_ratio"],
        "streaming last-byte p99 at c=50": stream["c50"]["vs_forwarder"]["ttlb_p99_ratio"],
        "Cognigy webhook p99 at c=50": hooks["cognigy_c50"]["p99_ratio"],
        "CXone webhook p99 at c=50": hooks["cxone_c50"]["p99_ratio"],
    }
    peak = round(r["service_memory"]["peak_rss_kib"] / 1024, 1)

    def row(name: str, goal: str, value: float | None, unit: str, met: bool) -> dict[str, Any]:
        return {
            "target": name,
            "goal": goal,
            "measured": value,
            "unit": unit,
            "met": None if value is None else met,
        }

    return [
        *(
            row(
                f"{name} req/s at c=50, % of forwarder's",
                f">= {GOAL_RPS_PCT:g}%",
                value,
                "%",
                value is not None and value >= GOAL_RPS_PCT,
            )
            for name, value in shares.items()
        ),
        *(
            row(
                f"{name}, x forwarder's",
                f"<= {GOAL_MULTIPLE:g}x",
                value,
                "x",
                value is not None and value <= GOAL_MULTIPLE,
            )
            for name, value in multiples.items()
        ),
        row(
            "service peak RSS (VmHWM)",
            f"<= {GOAL_PEAK_RSS_MIB:g} MiB",
            peak,
            "MiB",
            peak <= GOAL_PEAK_RSS_MIB,
        ),
    ]


def meta(bench: Bench, elapsed: float) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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
        "forwarders": "bench/forwarder.py: uvicorn (httptools, default loop, no access log) + "
        "FastAPI, one process, a lifespan-held aiohttp.ClientSession (forwarder_aiohttp, the "
        "reference) or httpx.AsyncClient over httpx-aiohttp (forwarder_httpx); the service's "
        "upstream calls, no auth, no validation",
        "note": "one run on a shared machine; wrk/the client, the fake and the service "
        "share the cores",
    }


# --- reports -------------------------------------------------------------------------------------


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def num(value: float | None, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:g}{suffix}"


def markdown(r: dict[str, Any]) -> str:
    m = r["meta"]
    labels = {**TARGET_LABELS, "service": "**service**"}
    lines = [
        "# cx-relay benchmark",
        "",
        f"{m['date']} · nproc {m['nproc']} · Python {m['python']} · {m['wrk']} · "
        f"{'quick' if m['quick'] else 'full'} run ({m['seconds_per_wrk_run']:.0f} s per wrk run, "
        f"{m['elapsed_seconds']:.0f} s in all)",
        "",
        f"Service: {m['service']}. {m['note']}; medians of one run, treat ratios as the signal.",
        "",
        f"Forwarders (the ceiling rows): {m.get('forwarders', '')}. Only the target of a "
        "measurement and the fake take load; the other processes sit idle.",
        "",
        "## Targets (issue 19)",
        "",
        "Against the aiohttp forwarder measured in the same run. Overhead = latency through the "
        "target minus latency direct to the fake.",
        "",
        "| target | goal | measured | met |",
        "|---|---|---:|---|",
    ]
    for t in r["targets"]:
        value = t["measured"]
        shown = "n/a" if value is None else f"{value:g}{'' if t['unit'] == 'x' else ' '}"
        shown += "" if value is None else t["unit"]
        met = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {shown} | {met} |")
    lines += [
        "",
        "## /v1/chat/completions, non-streaming (wrk)",
        "",
        "CPU = ms of CPU per request used by the process under test.",
        "",
        "| concurrency | target | req/s | p50 ms | p99 ms | CPU ms/req |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in ("c1", "c50"):
        row = r["chat"][c]
        for where in ("direct", "service", *FORWARDERS):
            x = row[where]
            cpu = "-" if where == "direct" else x["target_cpu_ms_per_request"]
            lines.append(
                f"| {c[1:]} | {labels[where]} | {x['rps']:.0f} | {ms(x['latency_us']['p50'])} | "
                f"{ms(x['latency_us']['p99'])} | {cpu} |"
            )
        k = row["compare"]
        lines.append(
            f"| {c[1:]} | service overhead over direct | /{k['throughput_ratio']} | "
            f"+{ms(k['p50_overhead_us'])} (x{k['p50_ratio']}) | "
            f"+{ms(k['p99_overhead_us'])} (x{k['p99_ratio']}) | |"
        )
        for name, v in (
            ("**service vs aiohttp forwarder**", row["vs_forwarder"]),
            ("httpx vs aiohttp forwarder", row["httpx_vs_aiohttp_forwarder"]),
        ):
            lines.append(
                f"| {c[1:]} | {name} | {num(v['rps_pct'], '%')} | "
                f"x{num(v['p50_ratio'])} (overhead x{num(v['p50_overhead_multiple'])}) | "
                f"x{num(v['p99_ratio'])} | x{num(v['cpu_ratio'])} |"
            )
    lines += [
        "",
        "## /v1/chat/completions, `stream: true` (bench/rawclient.py)",
        "",
        "First event = first `data:` SSE event received; last byte = end of the response.",
        "",
        "| concurrency | target | streams | streams/s | first event p50 ms | p99 ms "
        "| last byte p50 ms | p99 ms | CPU ms/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in ("c1", "c50"):
        row = r["stream"][c]
        for where in ("direct", "service", *FORWARDERS):
            x = row[where]
            cpu = "-" if where == "direct" else x.get("target_cpu_ms_per_request", "-")
            lines.append(
                f"| {c[1:]} | {labels[where]} | {x['requests']} | {x['rps']:.0f} | "
                f"{ms(x['ttfb_p50_us'])} | {ms(x['ttfb_p99_us'])} | "
                f"{ms(x['ttlb_p50_us'])} | {ms(x['ttlb_p99_us'])} | {cpu} |"
            )
        k = row["compare"]
        lines.append(
            f"| {c[1:]} | service overhead over direct | | | "
            f"+{ms(k['ttfb_p50_us']['overhead_us'])} "
            f"(x{k['ttfb_p50_us']['ratio']}) | +{ms(k['ttfb_p99_us']['overhead_us'])} | "
            f"+{ms(k['ttlb_p50_us']['overhead_us'])} (x{k['ttlb_p50_us']['ratio']}) | "
            f"+{ms(k['ttlb_p99_us']['overhead_us'])} | |"
        )
        for name, v in (
            ("**service vs aiohttp forwarder**", row["vs_forwarder"]),
            ("httpx vs aiohttp forwarder", row["httpx_vs_aiohttp_forwarder"]),
        ):
            lines.append(
                f"| {c[1:]} | {name} | | {num(v['rps_pct'], '%')} | "
                f"x{num(v['ttfb_p50_ratio'])} (overhead x{num(v['ttfb_p50_overhead_multiple'])})"
                f" | x{num(v['ttfb_p99_ratio'])} | "
                f"x{num(v['ttlb_p50_ratio'])} (overhead x{num(v['ttlb_p50_overhead_multiple'])})"
                f" | x{num(v['ttlb_p99_ratio'])} | x{num(v['cpu_ratio'])} |"
            )
    lines += [
        "",
        "## Webhooks, concurrency 50 (wrk)",
        "",
        "The forwarders make the service's upstream calls for each webhook (Cognigy: the CXone "
        "messages GET and a JSON chat completion; CXone: the messages GET and a streamed chat "
        "completion read to its end), and nothing else.",
        "",
        "| webhook | target | req/s | p50 ms | p99 ms | CPU ms/req | upstream calls |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    hooks = r["webhooks"]
    for name, key in (
        ("Cognigy fallback (HMAC, CXone history)", "cognigy_c50"),
        ("CXone bot turn", "cxone_c50"),
    ):
        for where in ("service", *FORWARDERS):
            x = hooks[key] if where == "service" else hooks["forwarders"][where][key]
            calls = ", ".join(f"{k} {v}" for k, v in sorted(x["upstream_calls"].items()))
            lines.append(
                f"| {name} | {labels[where]} | {x['rps']:.0f} | {ms(x['latency_us']['p50'])} | "
                f"{ms(x['latency_us']['p99'])} | {x['target_cpu_ms_per_request']} | "
                f"{x['requests']} requests → {calls} |"
            )
        v = hooks["vs_forwarder"][key]
        lines.append(
            f"| {name} | **service vs aiohttp forwarder** | {num(v['rps_pct'], '%')} | "
            f"x{num(v['p50_ratio'])} | x{num(v['p99_ratio'])} | x{num(v['cpu_ratio'])} | |"
        )
    fu = r["fake_upstream"]
    s = r["sessions"]
    mem = r["service_memory"]
    fwd_mem = r.get("forwarders_memory", {})
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
        *(
            f"- {TARGET_LABELS[name].capitalize()} peak RSS (whole run): "
            f"**{f['peak_rss_kib'] / 1024:.1f} MiB** (at start {f['rss_at_start_kib'] / 1024:.1f}"
            " MiB)"
            for name, f in fwd_mem.items()
            if "peak_rss_kib" in f
        ),
        f"- Per session: **{s['bytes_per_session']:.0f} bytes** "
        f"(RSS {s['rss_before_kib'] / 1024:.1f} → {s['rss_after_kib'] / 1024:.1f} MiB over "
        f"{s['sessions']} sessions; method: {s['method']}). {s.get('note', '')}",
        "",
        *workers_section(r.get("workers")),
        "## The fake upstream alone (wrk straight at it, before the service starts)",
        "",
        f"- c=1: {fu['c1']['rps']:.0f} req/s, p50 {ms(fu['c1']['latency_us']['p50'])} ms, "
        f"p99 {ms(fu['c1']['latency_us']['p99'])} ms",
        f"- c=50: {fu['c50']['rps']:.0f} req/s, p50 {ms(fu['c50']['latency_us']['p50'])} ms, "
        f"p99 {ms(fu['c50']['latency_us']['p99'])} ms",
        "",
    ]
    return "\n".join(lines)


def workers_section(workers: dict[str, Any] | None) -> list[str]:
    if not workers:
        return []
    lines = [
        "## Several workers (/v1/chat/completions, non-streaming, c=50)",
        "",
        "The same service restarted with `WORKERS` and `STORE_BACKEND` set, warmed up, then "
        f"measured (Redis: {workers['redis_url']}). CPU ms/req: the service's processes, the "
        "fake's and what wrk left of two cores.",
        "",
        "| store | WORKERS | req/s | p50 ms | p99 ms | service CPU ms/req | fake CPU ms/req "
        "| 2 workers / 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend in ("sqlite", "redis"):
        rows = workers.get(backend, {})
        if "skipped" in rows:
            lines.append(f"| {backend} | | skipped: {rows['skipped']} | | | | | |")
            continue
        for key in ("w1", "w2"):
            x = rows[key]
            ratio = f"x{num(rows['two_to_one'])}" if key == "w2" else ""
            lines.append(
                f"| {backend} | {key[1:]} | {x['rps']:.0f} | {ms(x['latency_us']['p50'])} | "
                f"{ms(x['latency_us']['p99'])} | {x['target_cpu_ms_per_request']} | "
                f"{x['cpu_ms_per_request'].get('fake_upstream', '-')} | {ratio} |"
            )
    return [*lines, ""]


def plot(r: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("WARNING: matplotlib is not installed (`make bench` installs it): no latest.png")
        return False
    series = {
        "direct": "direct to fake upstream",
        "service": "through cx-relay",
        "forwarder_aiohttp": "bare forwarder (aiohttp)",
        "forwarder_httpx": "bare forwarder (httpx)",
    }
    width = 0.8 / len(series)

    def bars(ax: Any, names: list[str], values: dict[str, list[float]]) -> None:
        xs = range(len(names))
        for i, (key, label) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar([x + offset for x in xs], values[key], width, label=label)
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")

    fig, (lat_ax, rps_ax) = plt.subplots(1, 2, figsize=(14, 5.5))
    labels: list[str] = []
    latency: dict[str, list[float]] = {key: [] for key in series}
    for c in ("c1", "c50"):
        for q in ("p50", "p99"):
            labels.append(f"chat {c} {q}")
            for key in series:
                latency[key].append(r["chat"][c][key]["latency_us"][q] / 1000)
    for c in ("c1", "c50"):
        for field_name, name in (
            ("ttfb_p50_us", "1st ev p50"),
            ("ttlb_p50_us", "last p50"),
            ("ttlb_p99_us", "last p99"),
        ):
            labels.append(f"stream {c} {name}")
            for key in series:
                latency[key].append(r["stream"][c][key][field_name] / 1000)
    bars(lat_ax, labels, latency)
    lat_ax.set_ylabel("latency, ms (log)")
    lat_ax.set_title("Latency percentiles")
    names = ["chat c1", "chat c50", "stream c1", "stream c50", "cognigy c50", "cxone c50"]
    rps: dict[str, list[float]] = {key: [] for key in series}
    hooks = r["webhooks"]
    for key in series:
        rps[key] += [r[kind][c][key]["rps"] for kind in ("chat", "stream") for c in ("c1", "c50")]
        for hook in ("cognigy_c50", "cxone_c50"):
            if key == "direct":
                rps[key].append(0)
            elif key == "service":
                rps[key].append(hooks[hook]["rps"])
            else:
                rps[key].append(hooks["forwarders"][key][hook]["rps"])
    bars(rps_ax, names, rps)
    rps_ax.set_ylabel("requests/s (log)")
    rps_ax.set_title("Throughput")
    m = r["meta"]
    fig.suptitle(f"cx-relay overhead · {m['date']} · nproc {m['nproc']} · Python {m['python']}")
    handles, legend_labels = lat_ax.get_legend_handles_labels()
    fig.legend(
        handles, legend_labels, loc="upper center", ncol=len(series), bbox_to_anchor=(0.5, 0.95)
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    pictured = plot(bench.results, args.out / "latest.png")
    shutil.rmtree(bench.tmp, ignore_errors=True)
    log(f"wrote {args.out}/latest.json, latest.md" + (", latest.png" if pictured else ""))
    print()
    print(markdown(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
