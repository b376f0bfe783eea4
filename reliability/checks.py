"""What the crash suite checks, read straight from the store the service wrote (the SQLite file
under DATA_DIR, or the Redis keys), never through the service's own accounting.

A `Snapshot` holds every usage record and every budget counter, and the reservations still held.
`verify` holds them against what the clients saw (`Outcome`s):

* lost        an answered request whose session has fewer records than answers
* duplicated  a session with more records than requests that may have made one (answers,
              fallbacks, and requests cut by the kill, whose record may be in before the answer;
              a CXone turn cut before its answer may leave one on a session nobody knows)
* mismatched  a record whose tokens differ from the usage its answer reported
* budget      a budget counter whose used tokens or cost differ from the sum of its records
              (session scopes; a tenant's day and month scopes against all its records)
* held        a counter whose reserved amount differs from its open reservations
* overspent   a limited scope used past its limit (the documented bound is zero here: every call
              reserves prompt + max_tokens and the fake provider uses less)
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import redis

from reliability.load import Outcome

ScopeKey = tuple[str, str, str]  # tenant, kind, scope id


@dataclass
class Snapshot:
    records: list[dict[str, Any]] = field(default_factory=list)
    used: dict[ScopeKey, tuple[int, int]] = field(default_factory=dict)  # tokens, cost µ
    reserved: dict[ScopeKey, int] = field(default_factory=dict)  # the counters' reserved tokens
    held: dict[ScopeKey, int] = field(default_factory=dict)  # tokens of open reservations
    open_reservations: int = 0


def read_sqlite(path: Path) -> Snapshot:
    snap = Snapshot()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        for row in db.execute(
            "SELECT id, tenant, session, surface, prompt_tokens, completion_tokens, cost_micros, "
            "cached FROM usage_records"
        ):
            snap.records.append(_record(*row))
        for tenant, kind, sid, used, cost, reserved in db.execute(
            "SELECT tenant, kind, scope_id, used_tokens, used_cost_micros, reserved_tokens "
            "FROM budget_counters"
        ):
            snap.used[(tenant, kind, sid)] = (used, cost)
            snap.reserved[(tenant, kind, sid)] = reserved
        for tenant, scopes, tokens in db.execute(
            "SELECT tenant, scopes, tokens FROM budget_reservations WHERE state = 'reserved'"
        ):
            snap.open_reservations += 1
            for kind, sid in json.loads(scopes):
                key = (tenant, kind, sid)
                snap.held[key] = snap.held.get(key, 0) + tokens
    finally:
        db.close()
    return snap


def read_redis(url: str, prefix: str) -> Snapshot:
    """The key layout of app/store/redis_budget.py and redis_ledger.py."""
    snap = Snapshot()
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        for key in client.scan_iter(match=f"{prefix}{{*}}:u:rec", count=1000):
            for text in client.hvals(key):
                data = json.loads(text)
                snap.records.append(
                    _record(
                        data["id"],
                        data["tenant"],
                        data["session"],
                        data["surface"],
                        data["prompt_tokens"],
                        data["completion_tokens"],
                        round(data["cost"] * 1_000_000),
                        data["cached"],
                    )
                )
        reservations: set[str] = set()
        for key in client.scan_iter(match=f"{prefix}{{*}}:b:*", count=1000):
            tenant_part, _, rest = key[len(prefix) + 1 :].partition("}:b:")
            kind, _, sid = rest.partition(":")
            tenant = unquote(tenant_part)
            if sid.endswith(":held"):
                scope = (tenant, kind, unquote(sid[: -len(":held")]))
                for member in client.zrange(key, 0, -1):
                    rid, tokens, _cost = member.split("|")
                    reservations.add(rid)
                    snap.held[scope] = snap.held.get(scope, 0) + int(tokens)
                continue
            fields = client.hgetall(key)
            scope = (tenant, kind, unquote(sid))
            snap.used[scope] = (int(fields.get("used_tokens", 0)), int(fields.get("used_cost", 0)))
            snap.reserved[scope] = int(fields.get("reserved_tokens", 0))
        snap.open_reservations = len(reservations)
    finally:
        client.close()
    return snap


def _record(
    rid: str,
    tenant: str,
    session: str,
    surface: str,
    prompt: int,
    completion: int,
    cost_micros: int,
    cached: Any,
) -> dict[str, Any]:
    return {
        "id": rid,
        "tenant": tenant,
        "session": session,
        "surface": surface,
        "tokens": int(prompt) + int(completion),
        "cost_micros": int(cost_micros),
        "cached": bool(cached),
    }


@dataclass
class Verdict:
    figures: dict[str, int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    outcomes: Iterable[Outcome],
    snap: Snapshot,
    *,
    limits: dict[str, int] | None = None,
    exact_sessions: bool = True,
) -> Verdict:
    """`exact_sessions`: every request had a session of its own, so an answered one must have
    exactly one record, with the tokens its answer reported. `limits`: scope kind -> token limit."""
    outcomes = list(outcomes)
    problems: list[str] = []
    by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in snap.records:
        by_session[record["session"]].append(record)
    answered: Counter[str] = Counter()
    may_record: Counter[str] = Counter()
    reported: dict[str, int | None] = {}
    for o in outcomes:
        if o.session is None:
            continue  # a CXone turn cut before its answer: its session is unknown
        if o.answered:
            answered[o.session] += 1
            reported[o.session] = 0 if o.cached else o.tokens
        if o.answered or o.fallback or o.status is None:
            may_record[o.session] += 1
    lost = sum(max(0, n - len(by_session.get(s, []))) for s, n in answered.items())
    # a CXone turn cut before its answer never learnt its session (the service makes it up):
    # its record, if it made one, is on a session no client knows
    unknown = sum(1 for o in outcomes if o.session is None and o.status is None)
    strays = sum(len(rs) for s, rs in by_session.items() if s not in may_record)
    duplicated = max(0, strays - unknown) + sum(
        max(0, len(rs) - may_record[s]) for s, rs in by_session.items() if s in may_record
    )
    ids = Counter(r["id"] for r in snap.records)
    duplicated += sum(n - 1 for n in ids.values() if n > 1)
    mismatched = 0
    if exact_sessions:
        for session, tokens in reported.items():
            records = by_session.get(session, [])
            if len(records) == 1 and tokens is not None and records[0]["tokens"] != tokens:
                mismatched += 1
                problems.append(f"record of {session}: {records[0]['tokens']} tokens, {tokens}")
    if lost:
        missing = [s for s, n in answered.items() if len(by_session.get(s, [])) < n]
        problems.append(f"{lost} answered requests have no record, e.g. {missing[:5]}")
    if duplicated:
        problems.append(f"{duplicated} duplicated records")

    # budgets against the ledger
    sums: dict[ScopeKey, list[int]] = defaultdict(lambda: [0, 0])
    tenant_sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in snap.records:
        entry = sums[(r["tenant"], "session", r["session"])]
        entry[0] += r["tokens"]
        entry[1] += r["cost_micros"]
        tenant_sums[r["tenant"]][0] += r["tokens"]
        tenant_sums[r["tenant"]][1] += r["cost_micros"]
    budget_mismatch = 0
    for key in set(sums) | {k for k in snap.used if k[1] == "session"}:
        used = snap.used.get(key, (0, 0))
        if list(used) != sums.get(key, [0, 0]):
            budget_mismatch += 1
            if budget_mismatch <= 5:
                problems.append(f"budget {key}: used {used}, records {sums.get(key)}")
    for kind in ("tenant_day", "tenant_month"):
        periods: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for (tenant, k, _sid), (tokens, cost) in snap.used.items():
            if k == kind:
                periods[tenant][0] += tokens
                periods[tenant][1] += cost
        for tenant in set(periods) | set(tenant_sums):
            if periods.get(tenant, [0, 0]) != tenant_sums.get(tenant, [0, 0]):
                budget_mismatch += 1
                problems.append(
                    f"{kind} of {tenant}: used {periods.get(tenant)}, records "
                    f"{tenant_sums.get(tenant)}"
                )
    held_mismatch = sum(
        1
        for key in set(snap.reserved) | set(snap.held)
        if snap.reserved.get(key, 0) != snap.held.get(key, 0)
    )
    if held_mismatch:
        problems.append(f"{held_mismatch} scopes whose reserved counter != open reservations")
    overspent = 0
    for (_tenant, kind, sid), (tokens, _cost) in snap.used.items():
        limit = (limits or {}).get(kind)
        if limit is not None and tokens > limit:
            overspent += 1
            problems.append(f"{kind} {sid} used {tokens} tokens, limit {limit}")
    figures = {
        "records": len(snap.records),
        "cached_records": sum(1 for r in snap.records if r["cached"]),
        "lost_records": lost,
        "duplicated_records": duplicated,
        "mismatched_records": mismatched,
        "recorded_unanswered": sum(
            max(0, len(rs) - answered.get(s, 0)) for s, rs in by_session.items()
        ),
        "budget_mismatches": budget_mismatch,
        "held_mismatches": held_mismatch,
        "open_reservations": snap.open_reservations,
        "overspent_scopes": overspent,
        "max_session_used": max(
            (t for (_, k, _), (t, _) in snap.used.items() if k == "session"), default=0
        ),
    }
    return Verdict(figures, problems)
