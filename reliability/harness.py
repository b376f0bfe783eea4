"""The processes the slow suites drive, and what they read of them from /proc.

* `FakeUpstream`: bench/fake_upstream.py (an OpenAI-compatible provider and CXone on one port),
  run by reliability/upstream.py with a latency, so that calls are in flight when a kill lands.
* `Service`: `python -m app serve` on a free port with a DATA_DIR (or a Redis), its log in a file;
  started, SIGKILLed, restarted on the same data, or stopped with SIGTERM.
* `RedisServer`: a redis-server of our own on a free port (no persistence), for the replicas.
* `ProcSample`: RSS, open file descriptors and TCP connections of a pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

CLIENT_KEY = "reliability-client-key"
ADMIN_TOKEN = "reliability-admin-token"
COGNIGY_SECRET = "reliability-cognigy-secret"
CXONE_AUTH = "Bearer reliability-cxone-token"


def log(message: str) -> None:
    print(f"[reliability {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def answers(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status) == 200
    except OSError:
        return False


def wait_for(url: str, process: subprocess.Popen[bytes], what: str, log_file: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        if answers(url):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {url} within 60 s (log: {log_file})")


class FakeUpstream:
    """The benchmark's fake provider + CXone, each answer delayed by `latency_ms` (lo, hi)."""

    def __init__(self, workdir: Path, latency_ms: tuple[float, float] = (20.0, 60.0)) -> None:
        self.port = free_port()
        self.log_file = workdir / f"upstream-{self.port}.log"
        with self.log_file.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "reliability" / "upstream.py"),
                    "--port",
                    str(self.port),
                    "--latency-ms",
                    f"{latency_ms[0]},{latency_ms[1]}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(f"{self.url}/health", self.process, "the fake upstream", self.log_file)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)


class RedisServer:
    """A throw-away redis-server: no RDB, no AOF, on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log_file = workdir / f"redis-{self.port}.log"
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(self.log_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on :{self.port}")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.process)


def service_env(upstream: FakeUpstream, port: int, **overrides: str) -> dict[str, str]:
    """Everything the service needs against the fake: the bench's settings, plus an admin token
    for the /budget reads. cwd is a temporary directory, so no developer .env leaks in."""
    up = upstream.url
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "HOST": HOST,
            "PORT": str(port),
            "WORKERS": "1",
            "LOG_LEVEL": "INFO",
            "LLM_GATEWAY_BASE_URL": up,
            "LLM_GATEWAY_API_KEY": "reliability-upstream-key",
            "LLM_MODEL": "gpt-4o-mini",
            "COGNIGY_WEBHOOK_SECRET": COGNIGY_SECRET,
            "CXONE_WEBHOOK_AUTHORIZATION": CXONE_AUTH,
            "CLIENT_API_KEYS": f"{CLIENT_KEY}:reliability",
            # the load is one key's: the inbound limits are not what these runs measure
            "CLIENT_RATE_LIMIT_RPM": "none",
            "CLIENT_MAX_CONCURRENT_STREAMS": "none",
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "BOT_STATE_SECRET": "reliability-bot-state-secret-0123456789abcdef",
            "CXONE_CLIENT_ID": "reliability-client",
            "CXONE_CLIENT_SECRET": "reliability-client-secret",
            "CXONE_ACCESS_KEY_ID": "reliability-access-key",
            "CXONE_ACCESS_KEY_SECRET": "reliability-access-secret",
            "CXONE_TOKEN_URL": f"{up}/auth/token",
            "CXONE_API_BASE_URL": up,
            "SHUTDOWN_GRACE_SECONDS": "10",
        }
    )
    env.update(overrides)
    return env


class Service:
    """One `python -m app serve` process; `restart()` starts it again on the same environment
    (the same DATA_DIR or Redis), as an orchestrator would after a crash."""

    def __init__(self, workdir: Path, env: dict[str, str], name: str = "service") -> None:
        self.workdir = workdir
        self.env = env
        self.name = name
        self.port = int(env["PORT"])
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> float:
        """Start and wait until /health/live answers; the seconds it took."""
        started = time.monotonic()
        self.starts += 1
        with self.log_file.open("ab") as out:
            out.write(f"\n===== start {self.starts} =====\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app", "serve"],
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(f"{self.url}/health/live", self.process, self.name, self.log_file)
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL: no shutdown, no drain, nothing flushed — a crash, an OOM kill."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM, the graceful shutdown; the exit status (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        return stop_process(self.process)

    def log_lines(self, needle: str) -> list[str]:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return [line for line in text.splitlines() if needle in line]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 25.0) -> int | None:
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return None


# --- /proc ---------------------------------------------------------------------------------------

_TCP_STATES = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}


@dataclass(frozen=True)
class ProcSample:
    rss_kib: int
    fds: int
    tcp: dict[str, int]  # the process's TCP sockets by state

    @property
    def tcp_total(self) -> int:
        return sum(self.tcp.values())


def sample(pid: int) -> ProcSample:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    inodes: set[str] = set()
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    tcp: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if len(fields) > 9 and fields[9] in inodes:
                    state = _TCP_STATES.get(fields[3], "other")
                    tcp[state] = tcp.get(state, 0) + 1
    return ProcSample(rss, fds, tcp)
