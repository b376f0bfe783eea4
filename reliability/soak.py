"""Soak: steady mixed traffic for `--seconds` (600 by default), watching the service's resources.

One service (SQLite, one worker, INFO logs, intent cache on: the default deployment) against the
fake upstream with 20-60 ms of latency. An open-loop scheduler starts `--rate` requests a second
(40 % /v1/chat/completions, 20 % streamed, 20 % Cognigy, 20 % CXone; conversations of five turns
on one session; one question in ten is a repeat the intent cache answers), whatever the answers
take. Every 5 s the service's RSS, open file descriptors and TCP connections are sampled from
/proc; each minute's requests, errors and latencies are counted. At the end the service is
stopped with SIGTERM and its ledger checked (no answered turn without its record).

Pass criteria (after a warm-up of 20 % of the run, at least 15 s, at most 120 s, in which the
tokenizer, the connection pools, SQLite's page cache and the metrics' label sets fill up):

* RSS flat: it grows by at most max(16 MiB, 10 %) from the end of the warm-up to the end. Each
  request allocates and frees far more than that; a leak of even 1 KiB per request adds
  ~17 MiB over 10 minutes at 30 requests/s, so a real leak fails while the allocator's own
  settling does not.
* bounded fds and connections: never more than 32 above the warm-up level (the client keeps at
  most a few dozen keep-alive connections), and back within 8 of it once traffic stops.
* no error-rate drift: under 0.1 % errors overall, and no minute after the first above 1 %.
* no lost record and a clean (exit 0) SIGTERM.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from reliability.checks import read_sqlite, verify
from reliability.crash import keep_or_remove
from reliability.harness import (
    FakeUpstream,
    ProcSample,
    Service,
    free_port,
    log,
    sample,
    service_env,
)
from reliability.load import Outcome, Pool, send

MIX = {"chat": 40, "stream": 20, "cognigy": 20, "cxone": 20}
TURNS_PER_SESSION = 5
SAMPLE_EVERY = 5.0
MAX_IN_FLIGHT = 256
MIB = 1024


def warm_up(seconds: float) -> float:
    return min(120.0, max(15.0, 0.2 * seconds))


async def _drive(
    service: Service, seconds: float, rate: float, rng: random.Random
) -> tuple[list[Outcome], list[tuple[float, ProcSample]], int]:
    pool = Pool(service.port)
    outcomes: list[Outcome] = []
    samples: list[tuple[float, ProcSample]] = []
    in_flight: set[asyncio.Task[Outcome]] = set()
    skipped = 0
    started = time.monotonic()

    async def sampler() -> None:
        while True:
            samples.append((time.monotonic() - started, sample(service.pid)))
            await asyncio.sleep(SAMPLE_EVERY)

    sampling = asyncio.create_task(sampler())
    n = 0
    while time.monotonic() - started < seconds:
        surface = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        conversation = n // TURNS_PER_SESSION
        session = f"soak-{surface}-{conversation}" if surface != "cxone" else None
        if len(in_flight) >= MAX_IN_FLIGHT:
            skipped += 1
        else:
            task = asyncio.create_task(
                send(pool, surface, f"soak-{n}", n, rng.random() < 0.1, session)
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            task.add_done_callback(lambda t: outcomes.append(t.result()))
        n += 1
        await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
    if in_flight:
        await asyncio.wait(set(in_flight))
    await asyncio.sleep(SAMPLE_EVERY)  # traffic stopped: the idle sample
    samples.append((time.monotonic() - started, sample(service.pid)))
    sampling.cancel()
    await pool.close()
    for outcome in outcomes:
        outcome.started -= started
    return outcomes, samples, skipped


def per_minute(outcomes: list[Outcome], seconds: float) -> list[dict[str, Any]]:
    minutes: list[dict[str, Any]] = []
    for m in range(max(1, int(-(-seconds // 60)))):
        chunk = [o for o in outcomes if m * 60 <= o.started < (m + 1) * 60]
        latencies = sorted(o.latency_ms for o in chunk if o.status is not None)
        errors = sum(o.failed for o in chunk)
        minutes.append(
            {
                "minute": m + 1,
                "sent": len(chunk),
                "answered": sum(o.answered for o in chunk),
                "fallbacks": sum(o.fallback for o in chunk),
                "errors": errors,
                "error_rate": round(errors / len(chunk), 5) if chunk else 0.0,
                "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
                "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
                "max_ms": latencies[-1] if latencies else None,
            }
        )
    return minutes


def judge(
    samples: list[tuple[float, ProcSample]], minutes: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    warm = warm_up(seconds)
    after = [s for t, s in samples[:-1] if t >= warm] or [samples[-2][1]]
    base, end, idle = after[0], after[-1], samples[-1][1]
    growth = end.rss_kib - base.rss_kib
    rss_bound = max(16 * MIB, base.rss_kib // 10)
    sent = sum(m["sent"] for m in minutes)
    errors = sum(m["errors"] for m in minutes)
    criteria = {
        "rss_flat": growth <= rss_bound,
        "fds_bounded": max(s.fds for s in after) <= base.fds + 32 and idle.fds <= base.fds + 8,
        "tcp_bounded": max(s.tcp_total for s in after) <= base.tcp_total + 32
        and idle.tcp_total <= base.tcp_total + 8,
        "error_rate": errors <= 0.001 * sent
        and all(m["error_rate"] <= 0.01 for m in minutes[1:] if m["sent"]),
    }
    return {
        "warm_up_s": warm,
        "rss_mib": {
            "start": round(samples[0][1].rss_kib / MIB, 1),
            "after_warm_up": round(base.rss_kib / MIB, 1),
            "end": round(end.rss_kib / MIB, 1),
            "growth": round(growth / MIB, 1),
            "bound": round(rss_bound / MIB, 1),
            "peak": round(max(s.rss_kib for _, s in samples) / MIB, 1),
        },
        "fds": {"after_warm_up": base.fds, "max": max(s.fds for s in after), "idle": idle.fds},
        "tcp": {
            "after_warm_up": base.tcp_total,
            "max": max(s.tcp_total for s in after),
            "idle": idle.tcp_total,
        },
        "criteria": criteria,
    }


def run(seconds: float = 600.0, rate: float = 30.0, seed: int | None = None) -> dict[str, Any]:
    seed = seed if seed is not None else random.randrange(1_000_000)
    work = Path(tempfile.mkdtemp(prefix="cx-relay-soak-"))
    upstream = FakeUpstream(work)
    data_dir = work / "data"
    service = Service(work, service_env(upstream, free_port(), DATA_DIR=str(data_dir)))
    log(f"soak: {seconds:.0f}s at {rate:g} requests/s (seed {seed})")
    try:
        service.start()
        outcomes, samples, skipped = asyncio.run(
            _drive(service, seconds, rate, random.Random(seed))
        )
        exit_status = service.stop()
    finally:
        service.stop()
        upstream.stop()
    verdict = verify(outcomes, read_sqlite(data_dir / "cx-relay.sqlite3"), exact_sessions=False)
    minutes = per_minute(outcomes, seconds)
    result = judge(samples, minutes, seconds)
    result["criteria"]["no_lost_records"] = verdict.figures["lost_records"] == 0
    result["criteria"]["clean_exit"] = exit_status == 0
    result["criteria"]["budgets_equal_ledger"] = verdict.figures["budget_mismatches"] == 0
    result.update(
        name="soak",
        seed=seed,
        seconds=seconds,
        rate=rate,
        turns_sent=len(outcomes) + skipped,
        answered=sum(o.answered for o in outcomes),
        fallbacks=sum(o.fallback for o in outcomes),
        errors=sum(o.failed for o in outcomes) + skipped,
        skipped_overload=skipped,
        cached=sum(o.cached for o in outcomes),
        max_latency_ms=max((o.latency_ms for o in outcomes if o.status), default=0.0),
        lost_records=verdict.figures["lost_records"],
        duplicated_records=verdict.figures["duplicated_records"],
        budget_mismatches=verdict.figures["budget_mismatches"],
        sigterm_exit=exit_status,
        minutes=minutes,
        samples=[
            {"t": round(t, 1), "rss_mib": round(s.rss_kib / MIB, 1), "fds": s.fds, "tcp": s.tcp}
            for t, s in samples
        ],
        problems=verdict.problems,
        error_samples=[
            {k: o.as_dict()[k] for k in ("surface", "session", "status", "error", "reason")}
            for o in outcomes
            if o.failed
        ][:10],
    )
    result["ok"] = all(result["criteria"].values())
    keep_or_remove(work, result)
    rss = result["rss_mib"]
    log(
        f"soak done: {result['turns_sent']} turns, {result['errors']} errors, RSS "
        f"{rss['after_warm_up']} -> {rss['end']} MiB (bound +{rss['bound']}), fds "
        f"{result['fds']}, tcp {result['tcp']} — {'ok' if result['ok'] else 'FAILED'} "
        f"{result['criteria']}"
    )
    return result
