"""Metrics with several worker processes: the real service with WORKERS=2 counts every request
whichever worker answers it or the scrape; and the pieces behind that (the multiprocess
directory's preparation and wipe, the aggregation and its gauge modes, dead workers' gauges)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from app import serving
from app.core.settings import Settings
from app.observability.metrics import MULTIPROC_ENV, exposition, forget_dead_processes
from tests.helpers import free_port, service_env

REQUESTS = 40
CHAT_SUCCESS = 'cxrelay_requests_total{outcome="success",reason="",surface="chat"}'
STALE_PID = 99_999_999  # no such process: a previous run's worker


def write_sample(
    directory: Path, prefix: str, pid: int, metric: str, sample: str, value: float, **labels: str
) -> None:
    """One value in a per-process file, exactly as prometheus-client's multiprocess mode writes
    it (counter_<pid>.db, gauge_<mode>_<pid>.db)."""
    values = MmapedDict(str(directory / f"{prefix}_{pid}.db"))
    try:
        key = mmap_key(metric, sample, list(labels), list(labels.values()), "help")
        values.write_value(key, value, 0.0)
    finally:
        values.close()


def counts_by_process(directory: Path, name: str, **labels: str) -> dict[int, float]:
    """Each worker's own total of a counter's samples that carry `labels`, read from its file
    (a worker with none is absent)."""
    found: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, sample_labels, _ = json.loads(key)
            if sample == name and labels.items() <= sample_labels.items():
                found[pid] = found.get(pid, 0.0) + value
    return found


def requests_by_process(directory: Path) -> dict[int, float]:
    """Each worker's own count of /chat requests."""
    return counts_by_process(directory, "cxrelay_requests_total", surface="chat")


def scraped(text: str, line_start: str) -> float:
    values = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start)]
    assert len(values) == 1, text
    return values[0]


def _message(line: str) -> object:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut mid-write
    return record.get("message") if isinstance(record, dict) else None


def wait_until_both_live(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Live, and both workers started (each logs it): otherwise the first one to be ready would
    take every request. Each loads the app and its tokenizer: slow on a busy machine."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {log.read_text()[-3000:]}")
        started = sum(_message(line) == "cx-relay started" for line in log.read_text().splitlines())
        try:
            live = httpx.get(f"{base_url}/health/live", timeout=1).status_code == 200
        except httpx.TransportError:
            live = False
        if live and started == 2:
            return
        time.sleep(0.1)  # polling interval only; nothing asserts on timing
    pytest.fail(f"two workers not live within 90 s: {log.read_text()[-3000:]}")


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`python -m app serve --simulate` with WORKERS=2 and a metrics directory holding a previous
    run's counter (1000 successful /chat requests), which must not count."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    stale = {"surface": "chat", "outcome": "success", "reason": ""}
    write_sample(
        metrics_dir,
        "counter",
        STALE_PID,
        "cxrelay_requests",
        "cxrelay_requests_total",
        1000,
        **stale,
    )
    port = free_port()
    log = tmp_path / "stderr.log"
    env = service_env(WORKERS="2", **{MULTIPROC_ENV: str(metrics_dir)})
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--simulate", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_until_both_live(base_url, process, log)
            yield base_url, metrics_dir
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()[-2000:]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


@pytest.mark.slow
async def test_every_request_is_counted_whichever_worker_answers(
    two_workers: tuple[str, Path],
) -> None:
    base_url, metrics_dir = two_workers
    gate = asyncio.Semaphore(8)
    # no keep-alive: every request is a new connection, which either worker may accept
    limits = httpx.Limits(max_keepalive_connections=0)
    headers = {"Authorization": "Bearer cx-relay-dev-key"}
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=15) as client:

        async def ask(n: int) -> int:
            body = {"session_id": f"mp-{n}", "messages": [{"role": "user", "content": f"Q{n}"}]}
            async with gate:
                return (await client.post("/chat", json=body, headers=headers)).status_code

        statuses = await asyncio.gather(*(ask(n) for n in range(REQUESTS)))
        assert statuses == [200] * REQUESTS
        scrapes = [(await client.get("/metrics")).text for _ in range(6)]

    by_process = requests_by_process(metrics_dir)
    assert STALE_PID not in by_process  # the previous run's file was wiped at start
    assert len(by_process) == 2, by_process  # both workers answered some
    assert sum(by_process.values()) == REQUESTS
    for text in scrapes:  # whichever worker served the scrape, it saw both
        assert scraped(text, CHAT_SUCCESS) == REQUESTS
        assert scraped(text, 'cxrelay_provider_keys_healthy{provider="default"}') == 1
        assert scraped(text, 'cxrelay_provider_circuit_state{provider="default"}') == 0


# --- the parts ---------------------------------------------------------------------------------


def test_exposition_adds_up_processes_and_takes_the_worst_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = os.getpid()  # alive, so its live gauges are kept
    parent = os.getppid()
    for pid, requests, healthy, circuit in ((me, 3, 2, 0), (parent, 4, 1, 2)):
        labels = {"surface": "cognigy", "outcome": "success", "reason": ""}
        write_sample(
            tmp_path,
            "counter",
            pid,
            "cxrelay_requests",
            "cxrelay_requests_total",
            requests,
            **labels,
        )
        keys = "cxrelay_provider_keys_healthy"
        write_sample(tmp_path, "gauge_livemin", pid, keys, keys, healthy, provider="p")
        state = "cxrelay_provider_circuit_state"
        write_sample(tmp_path, "gauge_livemax", pid, state, state, circuit, provider="p")
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    text = exposition()[0].decode()
    assert scraped(text, 'cxrelay_requests_total{outcome="success"') == 7
    assert scraped(text, "cxrelay_provider_keys_healthy{") == 1  # the fewest any worker trusts
    assert scraped(text, "cxrelay_provider_circuit_state{") == 2  # the worst breaker


@pytest.mark.slow
def test_a_dead_workers_live_gauges_are_dropped_but_its_counters_stay(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(dead.stdout)
    for prefix in ("counter", "gauge_livemax", "gauge_livemin"):
        write_sample(tmp_path, prefix, pid, "m", "m", 1)
        write_sample(tmp_path, prefix, os.getpid(), "m", "m", 1)
    forget_dead_processes(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    mine = os.getpid()
    assert left == sorted(
        [
            f"counter_{pid}.db",
            f"counter_{mine}.db",
            f"gauge_livemax_{mine}.db",
            f"gauge_livemin_{mine}.db",
        ]
    )


def test_the_directory_is_wiped_of_metric_files_only(tmp_path: Path) -> None:
    for name in ("counter_12.db", "histogram_12.db", "gauge_livemax_12.db", "gauge_all_7.db"):
        (tmp_path / name).write_bytes(b"old")
    for name in ("cx-relay.sqlite3", "audit.db", "counter_notes.db", "README"):
        (tmp_path / name).write_bytes(b"keep")
    env = {MULTIPROC_ENV: str(tmp_path)}
    assert serving.prepare_metrics_dir(4, env) == (tmp_path, False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["README", "audit.db", "counter_notes.db", "cx-relay.sqlite3"]


def test_one_worker_without_a_directory_uses_the_in_process_registry() -> None:
    env: dict[str, str] = {}
    assert serving.prepare_metrics_dir(1, env) == (None, False)
    assert env == {}


def test_workers_get_a_temporary_directory_set_before_they_start_and_removed_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (MULTIPROC_ENV, "SIMULATE"):  # serve sets both: undone after the test
        monkeypatch.setenv(name, "recorded")
        monkeypatch.delenv(name)
    seen: dict[str, Any] = {}

    def fake_run(app: object, **options: Any) -> None:
        directory = os.environ[MULTIPROC_ENV]
        seen.update(options, app=app, directory=directory, exists=Path(directory).is_dir())
        seen["simulate"] = os.environ.get("SIMULATE")

    monkeypatch.setattr(serving.uvicorn, "run", fake_run)
    settings = Settings(_env_file=None, simulate=True, workers=3)  # type: ignore[call-arg]
    assert serving.serve(settings, {"simulate": True}) == 0
    assert seen["app"] == "app.worker:worker_app"
    assert (seen["factory"], seen["workers"], seen["exists"]) == (True, 3, True)
    assert seen["simulate"] == "true"  # the command line's override, where workers read it
    assert Path(seen["directory"]).name.startswith("cx-relay-metrics-")
    assert not Path(seen["directory"]).exists()


def test_the_worker_factory_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    levels: list[str] = []
    monkeypatch.setattr(serving, "configure_logging", levels.append)  # not this test process's
    monkeypatch.setenv("SIMULATE", "true")
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    app = serving.worker_app()
    assert app.state.settings.simulate is True
    assert levels == ["WARNING"]  # a spawned worker inherits no logging set-up
