"""The Store contract, run against every backend: memory, SQLite (a file under tmp_path; in
threads, and inline as one worker runs it) and the real Redis on 127.0.0.1:6379 (a unique key
prefix per test, deleted afterwards). The Redis tests fail, not skip, when Redis is not there:
the multi-replica budget is a promise, not an option."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.store import (
    NO_SESSION,
    BudgetScope,
    MemoryStore,
    Refusal,
    Reservation,
    SQLiteStore,
    Store,
    StoreUnavailable,
    UsageRecord,
)
from app.store.redis_store import RedisStore
from tests.helpers import worker_id

REDIS_URL = "redis://127.0.0.1:6379/0"
# sqlite-inline: statements on the event loop, writes group-committed (one worker's default)
BACKENDS = ["memory", "sqlite", "sqlite-inline", "redis"]


# --- fixtures shared with test_budget.py and test_ledger.py ---------------------------------------


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix no other test, xdist worker or run uses (its worker named, to tell whose
    keys are left if a run is killed); every key under it is deleted afterwards."""
    prefix = f"cxrelay-test-{worker_id()}-{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@asynccontextmanager
async def open_store(backend: str, tmp_path: Path, **options: Any) -> AsyncIterator[Store]:
    """One store of `backend`, closed (and for Redis, its keys deleted) on exit."""
    if backend == "memory":
        store: Store = MemoryStore(**options)
        yield store
        await store.close()
    elif backend in ("sqlite", "sqlite-inline"):
        if backend == "sqlite-inline":
            options = {"synchronous": "NORMAL", "inline": True, **options}
        store = await SQLiteStore.open(tmp_path, **options)
        try:
            yield store
        finally:
            await store.close()
    elif backend == "redis":
        async with redis_prefix() as prefix:
            store = await RedisStore.open(REDIS_URL, prefix=prefix, **options)
            try:
                yield store
            finally:
                await store.close()
    else:
        raise AssertionError(backend)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as opened:
        yield opened


def make_record(
    tenant: str = "acme",
    session: str = "s1",
    *,
    prompt: int = 100,
    completion: int = 20,
    cost: float = 0.0015,
    at: datetime | None = None,
    record_id: str | None = None,
    **fields: Any,
) -> UsageRecord:
    extra: dict[str, Any] = {"time": at} if at is not None else {}
    if record_id is not None:
        extra["id"] = record_id
    return UsageRecord(
        tenant=tenant,
        session=session,
        surface=fields.pop("surface", "chat"),
        provider=fields.pop("provider", "openai"),
        model=fields.pop("model", "gpt-4o-mini"),
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost=cost,
        latency_ms=fields.pop("latency_ms", 123.4),
        **extra,
        **fields,
    )


def session_scope(limit: int | None = 1000, tenant: str = "acme", sid: str = "s1") -> BudgetScope:
    return BudgetScope("session", tenant, sid, limit_tokens=limit)


# --- budget arithmetic ----------------------------------------------------------------------------


async def test_reserve_settle_release_arithmetic(store: Store) -> None:
    scope = session_scope(1000)
    first = await store.reserve([scope], 300)
    assert isinstance(first, Reservation)
    assert first.remaining_before == ((1000, None),)
    usage = await store.usage(scope)
    assert (usage.used_tokens, usage.reserved_tokens, usage.remaining_tokens) == (0, 300, 700)

    assert await store.settle(first, 250) is True
    usage = await store.usage(scope)
    assert (usage.used_tokens, usage.reserved_tokens, usage.remaining_tokens) == (250, 0, 750)

    second = await store.reserve([scope], 400)
    assert isinstance(second, Reservation)
    assert second.remaining_before == ((750, None),)
    assert await store.remaining(scope) == (350, None)
    assert await store.release(second) is True
    assert await store.remaining(scope) == (750, None)

    # a retried settle or release counts once; releasing after a settle gives nothing back
    assert await store.settle(first, 250) is False
    assert await store.release(second) is False
    assert await store.release(first) is False
    usage = await store.usage(scope)
    assert (usage.used_tokens, usage.reserved_tokens) == (250, 0)


async def test_usages_reads_several_scopes_at_once_like_usage(store: Store) -> None:
    session = session_scope(1000)
    day = BudgetScope("tenant_day", "acme", "2026-11-25", limit_tokens=5000)
    untouched = BudgetScope("tenant_month", "acme", "2026-11")
    held = await store.reserve([session, day], 300)
    assert isinstance(held, Reservation)
    assert await store.settle(held, 120)
    assert isinstance(await store.reserve([session], 50), Reservation)
    together = await store.usages([session, day, untouched])
    assert together == [await store.usage(s) for s in (session, day, untouched)]
    assert [(u.used_tokens, u.reserved_tokens) for u in together] == [(120, 50), (120, 0), (0, 0)]
    assert [u.remaining_tokens for u in together] == [830, 4880, None]


async def test_refusal_names_the_scope_and_what_is_left_and_reserves_nothing(store: Store) -> None:
    session = session_scope(500)
    day = BudgetScope("tenant_day", "acme", "2026-11-25")  # counted, unlimited
    assert isinstance(await store.reserve([session, day], 400), Reservation)

    refused = await store.reserve([session, day], 200)
    assert isinstance(refused, Refusal)
    assert refused.scope == session
    assert refused.dimension == "tokens"
    assert (refused.remaining_tokens, refused.requested_tokens) == (100, 200)
    assert "100 tokens left" in refused.message and "200 needed" in refused.message
    body = refused.as_dict()
    assert body["scope"] == "session" and body["scope_id"] == "s1"
    assert body["remaining_tokens"] == 100
    # all or nothing: the refused request held nothing on the day either
    assert (await store.usage(day)).reserved_tokens == 400


async def test_tenant_day_limit_in_tokens(store: Store) -> None:
    day = BudgetScope("tenant_day", "acme", "2026-11-25", limit_tokens=1000)
    for sid in ("a", "b"):
        granted = await store.reserve([session_scope(None, sid=sid), day], 450)
        assert isinstance(granted, Reservation)
        await store.settle(granted, 450)
    refused = await store.reserve([session_scope(None, sid="c"), day], 200)
    assert isinstance(refused, Refusal)
    assert (refused.scope.kind, refused.scope.id) == ("tenant_day", "2026-11-25")
    assert refused.remaining_tokens == 100
    # another day is another counter
    tomorrow = BudgetScope("tenant_day", "acme", "2026-11-26", limit_tokens=1000)
    assert isinstance(
        await store.reserve([session_scope(None, sid="c"), tomorrow], 200), Reservation
    )


async def test_tenant_month_limit_in_money_is_exact(store: Store) -> None:
    month = BudgetScope("tenant_month", "acme", "2026-11", limit_cost=0.05)
    for _ in range(3):
        granted = await store.reserve([month], 100, cost=0.01)
        assert isinstance(granted, Reservation)
        await store.settle(granted, 90, actual_cost=0.01)
    assert await store.remaining(month) == (None, pytest.approx(0.02))
    # 0.01 + 0.01 reach the limit exactly (kept in micro-units: no float drift)
    for _ in range(2):
        granted = await store.reserve([month], 100, cost=0.01)
        assert isinstance(granted, Reservation)
        await store.settle(granted, 90, actual_cost=0.01)
    assert (await store.usage(month)).used_cost_micros == 50_000
    refused = await store.reserve([month], 1, cost=0.000001)
    assert isinstance(refused, Refusal)
    assert (refused.scope.kind, refused.dimension) == ("tenant_month", "cost")
    assert refused.remaining_cost == 0.0
    assert "monthly budget" in refused.message


async def test_settle_records_real_usage_past_the_limit_and_then_refuses(store: Store) -> None:
    scope = session_scope(100)
    granted = await store.reserve([scope], 100)
    assert isinstance(granted, Reservation)
    await store.settle(granted, 130)  # the provider used more than reserved: recorded, not hidden
    usage = await store.usage(scope)
    assert usage.used_tokens == 130
    assert usage.remaining_tokens == 0
    assert isinstance(await store.reserve([scope], 1), Refusal)
    assert isinstance(await store.reserve([scope], 0), Reservation)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_forgotten_reservation_expires_and_a_late_settle_still_counts(
    backend: str, tmp_path: Path
) -> None:
    async with open_store(backend, tmp_path, reservation_ttl_seconds=0.3) as store:
        scope = session_scope(100)
        lost = await store.reserve([scope], 100)
        assert isinstance(lost, Reservation)
        assert isinstance(await store.reserve([scope], 1), Refusal)
        await asyncio.sleep(0.5)
        assert await store.remaining(scope) == (100, None)
        again = await store.reserve([scope], 60)
        assert isinstance(again, Reservation)
        assert await store.settle(lost, 40) is True  # its replica came back: usage still counted
        usage = await store.usage(scope)
        assert (usage.used_tokens, usage.reserved_tokens) == (40, 60)
        assert await store.release(lost) is False


async def test_invalid_reservations_are_rejected(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.reserve([], 10)
    with pytest.raises(ValueError):
        await store.reserve([session_scope(), session_scope(tenant="other")], 10)
    with pytest.raises(ValueError):
        await store.reserve([session_scope()], -1)
    with pytest.raises(ValueError):
        BudgetScope("week", "acme", "x")  # type: ignore[arg-type]


# --- concurrency ----------------------------------------------------------------------------------


async def _spend_concurrently(
    stores: list[Store], limit: int, each: int, requests: int, sid: str = "hot"
) -> int:
    scope = session_scope(limit, sid=sid)

    async def one(i: int) -> bool:
        store = stores[i % len(stores)]
        outcome = await store.reserve([scope], each)
        if isinstance(outcome, Refusal):
            return False
        await asyncio.sleep(0)
        await store.settle(outcome, each)
        return True

    granted = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    usage = await stores[0].usage(scope)
    assert usage.reserved_tokens == 0
    assert usage.used_tokens == granted * each
    # never over by more than one request's reservation (atomic reserve: not over at all)
    assert usage.used_tokens <= limit
    assert usage.used_tokens > limit - each
    return granted


async def test_200_concurrent_requests_on_one_session_never_overspend(store: Store) -> None:
    assert await _spend_concurrently([store], limit=4096, each=100, requests=200) == 40


async def test_two_redis_replicas_cannot_both_spend_the_last_tokens() -> None:
    async with redis_prefix() as prefix:
        a = await RedisStore.open(REDIS_URL, prefix=prefix)
        b = await RedisStore.open(REDIS_URL, prefix=prefix)
        try:
            assert await _spend_concurrently([a, b], limit=4096, each=100, requests=200) == 40
            # the last tokens: exactly one of 200 requests, on either replica, gets them
            assert await _spend_concurrently([a, b], 4096, 4096, 200, sid="last") == 1
        finally:
            await a.close()
            await b.close()


async def test_two_sqlite_instances_on_one_file_share_the_budget(tmp_path: Path) -> None:
    a = await SQLiteStore.open(tmp_path)
    b = await SQLiteStore.open(tmp_path)
    try:
        assert await _spend_concurrently([a, b], limit=4096, each=100, requests=200) == 40
    finally:
        await a.close()
        await b.close()


# --- durability -----------------------------------------------------------------------------------


async def test_sqlite_restart_keeps_every_ledger_record_and_budget(tmp_path: Path) -> None:
    start = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    records = [make_record(at=start + timedelta(seconds=i)) for i in range(30)]
    scope = session_scope(4096)
    first = await SQLiteStore.open(tmp_path)
    await first.append_usages(records)
    settled = await first.reserve([scope], 500)
    held = await first.reserve([scope], 300)
    assert isinstance(settled, Reservation) and isinstance(held, Reservation)
    await first.settle(settled, 420, actual_cost=0.02)
    await first.close()
    assert first.path == tmp_path / "cx-relay.sqlite3"

    second = await SQLiteStore.open(tmp_path)
    try:
        page = await second.list_usage("acme", limit=500)
        assert [r.id for r in page.records] == [r.id for r in reversed(records)]
        assert page.records[0] == records[-1]
        usage = await second.usage(scope)
        assert (usage.used_tokens, usage.used_cost, usage.reserved_tokens) == (420, 0.02, 300)
        summary = await second.session_summary("acme", "s1")
        assert summary is not None and summary.totals.calls == 30
        # the in-flight reservation survived too, and settles on the new instance
        assert await second.settle(held, 100) is True
        assert await second.settle(settled, 420) is False
        assert (await second.usage(scope)).used_tokens == 520
    finally:
        await second.close()


async def test_sqlite_shares_the_audit_database_file(tmp_path: Path) -> None:
    from app.store.audit import AuditLog

    audit = await AuditLog.open(tmp_path)
    store = await SQLiteStore.open(tmp_path)
    try:
        await audit.append(
            actor="ops", action="apply", payload_sha256="x", result="ok", latency_ms=1.0
        )
        assert await store.append_usage(make_record()) is True
        assert await audit.count() == 1
        assert audit.path == store.path
    finally:
        await store.close()
        await audit.close()


# --- the ledger -----------------------------------------------------------------------------------


async def test_append_is_idempotent_on_the_record_id(store: Store) -> None:
    record = make_record()
    assert await store.append_usage(record) is True
    assert await store.append_usage(record) is False
    other = make_record(prompt=1, completion=1, cost=0.0)
    assert await store.append_usages([record, other, other]) == 1
    page = await store.list_usage("acme")
    assert sorted(r.id for r in page.records) == sorted([record.id, other.id])
    summary = await store.session_summary("acme", "s1")
    assert summary is not None
    assert (summary.totals.calls, summary.totals.prompt_tokens) == (2, 101)
    status = await store.tenant_status("acme")
    assert status.totals.calls == 2
    assert status.totals.cost == pytest.approx(0.0015)


async def test_records_round_trip_every_field(store: Store) -> None:
    record = make_record(
        cached=True, estimated=True, latency_ms=987.6, surface="cxone", provider="azure"
    )
    await store.append_usage(record)
    (stored,) = (await store.list_usage("acme")).records
    assert stored == record
    assert stored.time.tzinfo is not None


async def test_list_usage_pages_newest_first(store: Store) -> None:
    start = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    records = [
        make_record(session="s1" if i % 3 else "s2", at=start + timedelta(seconds=i // 2))
        for i in range(23)
    ]  # pairs share a timestamp: ties are ordered by id
    await store.append_usages(records[::2])
    await store.append_usages(records[1::2])
    expected = sorted(records, key=lambda r: (r.time, r.id), reverse=True)

    seen: list[UsageRecord] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.list_usage("acme", limit=5, cursor=cursor)
        pages += 1
        seen.extend(page.records)
        assert len(page.records) <= 5
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [r.id for r in seen] == [r.id for r in expected]
    assert pages == 5

    only_s2 = await store.list_usage("acme", "s2", limit=100)
    assert [r.id for r in only_s2.records] == [r.id for r in expected if r.session == "s2"]
    assert only_s2.next_cursor is None

    exact = await store.list_usage("acme", limit=23)
    assert len(exact.records) == 23 and exact.next_cursor is None
    with pytest.raises(ValueError):
        await store.list_usage("acme", cursor="not-a-cursor")
    with pytest.raises(ValueError):
        await store.list_usage("acme", limit=0)


async def test_session_summary_and_tenant_status(store: Store) -> None:
    now = datetime.now(UTC)
    old = now - timedelta(hours=3)
    await store.append_usages(
        [
            make_record(session="old", at=old, cost=0.5),
            make_record(session="old", at=old + timedelta(minutes=5), cost=0.25),
            make_record(session="live", at=now - timedelta(minutes=1), prompt=10, completion=5),
            make_record(session="newest", at=now, prompt=1, completion=1, cost=0.0),
        ]
    )
    summary = await store.session_summary("acme", "old")
    assert summary is not None
    assert summary.totals.calls == 2
    assert summary.totals.cost == pytest.approx(0.75)
    assert summary.totals.total_tokens == 240
    assert summary.first_at == old
    assert summary.last_at == old + timedelta(minutes=5)
    assert await store.session_summary("acme", "nope") is None

    status = await store.tenant_status("acme", active_window_seconds=1800)
    assert [s.session_id for s in status.sessions] == ["newest", "live", "old"]
    assert (status.sessions_total, status.active_sessions) == (3, 2)
    assert status.totals.calls == 4
    assert status.totals.cost == pytest.approx(0.7515)
    limited = await store.tenant_status("acme", session_limit=1)
    assert [s.session_id for s in limited.sessions] == ["newest"]
    assert limited.sessions_total == 3
    assert status.as_dict()["sessions"][0]["session_id"] == "newest"


async def test_a_call_without_a_session_is_in_the_tenant_totals_and_no_session_list(
    store: Store,
) -> None:
    """/v1 without X-Session-Id or `user`: the record has no session (NO_SESSION); it is listed
    and counted for its tenant, read back through JSON, and never shows up as a session."""
    now = datetime.now(UTC)
    loose = make_record(session=NO_SESSION, at=now, cost=0.5)
    await store.append_usages([make_record(session="s1", at=now - timedelta(minutes=1)), loose])

    page = await store.list_usage("acme", limit=10)
    assert [r.id for r in page.records] == [loose.id, page.records[1].id]
    assert page.records[0] == loose
    assert page.records[0].as_dict()["session"] is None
    assert UsageRecord.from_json(loose.to_json()) == loose
    # "" is no filter (as a blank ?session= is), never "the calls without a session"
    assert (await store.list_usage("acme", NO_SESSION, limit=10)).records == page.records
    assert await store.session_summary("acme", NO_SESSION) is None
    status = await store.tenant_status("acme")
    assert [s.session_id for s in status.sessions] == ["s1"]
    assert (status.sessions_total, status.active_sessions) == (1, 1)
    assert status.totals.calls == 2 and status.totals.cost == pytest.approx(0.5015)

    # its budget is the tenant's scopes only
    day = BudgetScope("tenant_day", "acme", "2026-11-25", limit_tokens=100)
    held = await store.reserve([day], 60)
    assert isinstance(held, Reservation)
    assert await store.settle_and_record(held, make_record(session=NO_SESSION, prompt=50))
    assert await store.remaining(day) == (30, None)
    assert (await store.tenant_status("acme")).sessions_total == 1


# --- tenant isolation -----------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["globex", "acme:{x}|y"])
async def test_a_tenant_never_sees_another_tenants_rows(store: Store, other: str) -> None:
    mine = [make_record("acme", "s1", cost=0.01) for _ in range(3)]
    theirs = [make_record(other, "s1", prompt=999, cost=9.0) for _ in range(4)]
    theirs.append(make_record(other, "their-only"))
    await store.append_usages(mine + theirs)

    page = await store.list_usage("acme", limit=100)
    assert {r.id for r in page.records} == {r.id for r in mine}
    assert {r.tenant for r in (await store.list_usage("acme", "s1", limit=100)).records} == {"acme"}
    assert (await store.list_usage("acme", "their-only")).records == []
    # a cursor taken from the other tenant's page is only a position in mine
    their_page = await store.list_usage(other, limit=1)
    assert their_page.next_cursor is not None
    after = await store.list_usage("acme", cursor=their_page.next_cursor, limit=100)
    assert {r.tenant for r in after.records} <= {"acme"}

    summary = await store.session_summary("acme", "s1")
    assert summary is not None and summary.totals.calls == 3
    assert summary.totals.prompt_tokens == 300
    assert await store.session_summary("acme", "their-only") is None
    status = await store.tenant_status("acme")
    assert [s.session_id for s in status.sessions] == ["s1"]
    assert status.totals.calls == 3 and status.totals.cost == pytest.approx(0.03)
    assert (await store.tenant_status(other)).totals.calls == 5

    # the same session id in two tenants is two budgets
    spent = await store.reserve([session_scope(100, tenant=other)], 100)
    assert isinstance(spent, Reservation)
    await store.settle(spent, 100)
    assert await store.remaining(session_scope(100)) == (100, None)
    assert isinstance(await store.reserve([session_scope(100)], 100), Reservation)


# --- lifecycle ------------------------------------------------------------------------------------


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_sqlite_operations_after_close_raise_store_unavailable(tmp_path: Path) -> None:
    store = await SQLiteStore.open(tmp_path)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.append_usage(make_record())


async def test_redis_unreachable_fails_at_open() -> None:
    with pytest.raises(StoreUnavailable):
        await RedisStore.open("redis://127.0.0.1:1/0", timeout_seconds=0.5)


async def test_redis_keys_carry_the_prefix_and_a_tenant_hash_tag() -> None:
    async with redis_prefix() as prefix:
        store = await RedisStore.open(REDIS_URL, prefix=prefix)
        try:
            granted = await store.reserve([session_scope(100)], 10)
            assert isinstance(granted, Reservation)
            await store.append_usage(make_record())
            client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
            keys = sorted([key async for key in client.scan_iter(match=f"{prefix}*")])
            await client.aclose()
            assert keys and all(key.startswith(prefix + "{acme}:") for key in keys)
            assert f"{prefix}{{acme}}:b:session:s1" in keys
            assert f"{prefix}{{acme}}:u:rec" in keys
        finally:
            await store.close()
