"""Crash consistency: SIGKILL the service under load, restart it on the same data, check the books.

Scenario `sqlite_kill` (the embedded default store): one service, DATA_DIR in a temporary
directory, `--rounds` times: concurrent clients send /v1/chat/completions (plain and streamed,
each request its own session; every tenth a repeated question, so intent-cache hits are in the
mix), Cognigy and CXone turns; at a random moment the service is SIGKILLed; it is restarted on
the same DATA_DIR and everything every client saw so far is checked against the SQLite file
(reliability/checks.py). At the end a SIGTERM must stop it with exit status 0, and once the
reservation TTL has passed the reservations of the killed calls must be given back.

Scenario `redis_replicas`: two replicas on one Redis (a redis-server of our own). Half the
requests share a few sessions at a time (every half-second a new group), sent to both replicas
at once, so both race for the same session budget (BUDGET_SESSION_TOKENS) all along; the other
half have sessions of their own. One replica is SIGKILLed mid-run, its clients move to the
other, it is restarted; then: no lost or duplicated record, budgets equal the ledger, and no
session used more than its limit (the documented bound: reservations never exceed a limit, and
a settle exceeds its reservation only when the provider uses more than prompt + max_tokens,
which the fake never does — so the bound here is zero).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from reliability.checks import Verdict, read_redis, read_sqlite, verify
from reliability.harness import (
    ADMIN_TOKEN,
    FakeUpstream,
    RedisServer,
    Service,
    free_port,
    log,
    service_env,
)
from reliability.load import Outcome, Pool, send

RESERVATION_TTL_SECONDS = 5  # the smallest allowed: the killed calls' holds come back quickly
WEIGHTS = {"chat": 40, "stream": 25, "cognigy": 20, "cxone": 15}


def pick(rng: random.Random) -> str:
    return rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "turns_sent": len(outcomes),
        "answered": sum(o.answered for o in outcomes),
        "fallbacks": sum(o.fallback for o in outcomes),
        "refused": sum(o.refused for o in outcomes),
        "cut_by_kill": sum(o.status is None for o in outcomes),
        "errors": sum(o.failed and o.status is not None for o in outcomes),
        "cached": sum(o.cached for o in outcomes),
        "max_latency_ms": max((o.latency_ms for o in outcomes if o.status), default=0.0),
        "reasons": dict(Counter(o.reason for o in outcomes if o.reason).most_common(8)),
    }


async def _load(
    pools: list[Pool],
    alive: list[bool],
    *,
    seconds: float,
    concurrency: int,
    tag: str,
    rng: random.Random,
    kill: tuple[float, Any] | None = None,
    shared_every: int = 0,
) -> list[Outcome]:
    """`concurrency` clients for `seconds`, spread over `pools` (only the `alive` ones); at
    kill[0] seconds kill[1]() runs. With `shared_every` N, every Nth request uses the current
    shared session group instead of a session of its own."""
    outcomes: list[Outcome] = []
    started = time.monotonic()
    stop_at = started + seconds

    async def client(w: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            targets = [p for p, up in zip(pools, alive, strict=True) if up]
            if not targets:
                return  # everything was killed: the round is over
            pool = targets[(w + i) % len(targets)]
            surface = pick(rng)
            session = None
            if shared_every and i % shared_every == 0:
                session = f"{tag}-shared-{int((time.monotonic() - started) * 2)}"
            key = f"{tag}-w{w}-{i}"
            repeat = session is None and i % 10 == 0
            outcomes.append(await send(pool, surface, key, i, repeat, session))

    async def killer() -> None:
        assert kill is not None
        await asyncio.sleep(kill[0])
        kill[1]()

    tasks = [asyncio.create_task(client(w)) for w in range(concurrency)]
    if kill is not None:
        tasks.append(asyncio.create_task(killer()))
    await asyncio.gather(*tasks)
    for pool in pools:
        await pool.close()
    return outcomes


def keep_or_remove(work: Path, result: dict[str, Any]) -> None:
    """The data, the logs and the database stay for a look when the scenario failed."""
    if result["ok"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result["workdir"] = str(work)
        log(f"  kept {work} (service logs, data) for a look")


def budget_status(service: Service, tenant: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{service.url}/budget/status?tenant={tenant}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        data: dict[str, Any] = json.loads(answer.read())
    return data


def _check(verdict: Verdict, where: str) -> None:
    status = "ok" if verdict.ok else "FAILED: " + "; ".join(verdict.problems[:5])
    figures = ", ".join(f"{k} {v}" for k, v in verdict.figures.items())
    log(f"  {where}: {figures} — {status}")


def sqlite_kill(rounds: int, concurrency: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="cx-relay-crash-"))
    upstream = FakeUpstream(work)
    data_dir = work / "data"
    env = service_env(
        upstream,
        free_port(),
        DATA_DIR=str(data_dir),
        STORE_BACKEND="sqlite",
        BUDGET_RESERVATION_TTL_SECONDS=str(RESERVATION_TTL_SECONDS),
    )
    service = Service(work, env)
    result: dict[str, Any] = {"name": "sqlite_kill", "store": "sqlite", "rounds": []}
    outcomes: list[Outcome] = []
    verdict = Verdict({}, ["not run"])
    try:
        service.start()
        for r in range(rounds):
            kill_at = rng.uniform(1.0, 4.0)
            alive = [True]

            def crash(flags: list[bool] = alive) -> None:
                service.kill()
                flags[0] = False

            got = asyncio.run(
                _load(
                    [Pool(service.port, "service")],
                    alive,
                    seconds=kill_at + 5,
                    concurrency=concurrency,
                    tag=f"k{seed}r{r}",
                    rng=rng,
                    kill=(kill_at, crash),
                )
            )
            outcomes += got
            restart = service.start()
            verdict = verify(outcomes, read_sqlite(data_dir / "cx-relay.sqlite3"))
            api = budget_status(service, "reliability")["totals"]["calls"]
            in_store = sum(
                1
                for o in read_sqlite(data_dir / "cx-relay.sqlite3").records
                if o["tenant"] == "reliability"
            )
            round_result = {
                "round": r + 1,
                "killed_after_s": round(kill_at, 2),
                "restart_s": round(restart, 2),
                **summarise(got),
                **verdict.figures,
                "api_calls_agree": api == in_store,
                "problems": verdict.problems,
            }
            result["rounds"].append(round_result)
            _check(verdict, f"round {r + 1}: killed at {kill_at:.2f}s, restarted in {restart:.1f}s")
            if api != in_store:
                verdict.problems.append(f"/budget/status says {api} calls, the store {in_store}")
        # the holds of the killed calls come back after the TTL (given back on the next reserve)
        time.sleep(RESERVATION_TTL_SECONDS + 0.5)
        outcomes += asyncio.run(
            _load([Pool(service.port)], [True], seconds=0.5, concurrency=2, tag="ttl", rng=rng)
        )
        exit_status = service.stop()
        final = read_sqlite(data_dir / "cx-relay.sqlite3")
        verdict = verify(outcomes, final)
        if final.open_reservations:
            verdict.problems.append(f"{final.open_reservations} reservations still held")
        if exit_status != 0:
            verdict.problems.append(f"SIGTERM exit status {exit_status}")
        result.update(summarise(outcomes), **verdict.figures, sigterm_exit=exit_status)
        result["problems"] = verdict.problems
        result["kills"] = rounds
        _check(verdict, f"after {rounds} kills and a SIGTERM (exit {exit_status})")
    finally:
        service.stop()
        upstream.stop()
    result["ok"] = verdict.ok and all(not r["problems"] for r in result["rounds"])
    keep_or_remove(work, result)
    return result


SESSION_LIMIT = 2000


def redis_replicas(concurrency: int, seed: int, seconds: float = 8.0) -> dict[str, Any]:
    rng = random.Random(seed + 1)
    work = Path(tempfile.mkdtemp(prefix="cx-relay-replicas-"))
    upstream = FakeUpstream(work)
    server = RedisServer(work)
    prefix = "reliability:"
    replicas = [
        Service(
            work,
            service_env(
                upstream,
                free_port(),
                STORE_BACKEND="redis",
                REDIS_URL=server.url,
                REDIS_KEY_PREFIX=prefix,
                DATA_DIR=str(work / f"data-{name}"),  # the audit log only
                BUDGET_SESSION_TOKENS=str(SESSION_LIMIT),
                BUDGET_RESERVATION_TTL_SECONDS=str(RESERVATION_TTL_SECONDS),
            ),
            name=f"replica-{name}",
        )
        for name in ("a", "b")
    ]
    result: dict[str, Any] = {"name": "redis_replicas", "store": "redis", "replicas": 2}
    verdict = Verdict({}, ["not run"])
    try:
        for replica in replicas:
            replica.start()
        alive = [True, True]
        kill_at = rng.uniform(2.0, seconds - 3.0)

        def kill_a() -> None:
            replicas[0].kill()
            alive[0] = False

        pools = [Pool(replicas[0].port, "replica-a"), Pool(replicas[1].port, "replica-b")]
        outcomes = asyncio.run(
            _load(
                pools,
                alive,
                seconds=seconds,
                concurrency=concurrency,
                tag=f"rp{seed}",
                rng=rng,
                kill=(kill_at, kill_a),
                shared_every=2,
            )
        )
        restart = replicas[0].start()
        verdict = verify(
            outcomes,
            read_redis(server.url, prefix),
            limits={"session": SESSION_LIMIT},
            exact_sessions=False,
        )
        exits = [replica.stop() for replica in replicas]
        if exits != [0, 0]:
            verdict.problems.append(f"SIGTERM exit statuses {exits}")
        killed = [o for o in outcomes if o.target == "replica-a"]
        result.update(
            summarise(outcomes),
            **verdict.figures,
            killed_after_s=round(kill_at, 2),
            restart_s=round(restart, 2),
            cut_on_killed_replica=sum(o.status is None for o in killed),
            session_limit=SESSION_LIMIT,
            sigterm_exits=exits,
            problems=verdict.problems,
        )
        _check(verdict, f"replica a killed at {kill_at:.2f}s, restarted in {restart:.1f}s")
    finally:
        for replica in replicas:
            replica.stop()
        server.stop()
        upstream.stop()
    result["ok"] = verdict.ok
    keep_or_remove(work, result)
    return result


def run(rounds: int = 5, concurrency: int = 32, seed: int | None = None) -> list[dict[str, Any]]:
    seed = seed if seed is not None else random.randrange(1_000_000)
    log(f"crash suite: seed {seed}, {rounds} kills on SQLite, then two replicas on Redis")
    started = time.monotonic()
    results = [sqlite_kill(rounds, concurrency, seed), redis_replicas(concurrency, seed)]
    for r in results:
        r["seed"] = seed
    log(f"crash suite done in {time.monotonic() - started:.0f}s")
    return results
