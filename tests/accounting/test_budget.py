"""Budgets as the pipeline sees them (BudgetService over each real store) and history truncation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from app.accounting.budget import (
    BudgetExhausted,
    BudgetPolicy,
    BudgetService,
    BudgetUnavailable,
    Grant,
    HistoryTooLong,
    PeriodLimits,
    fit_history,
    prompt_allowance,
)
from app.core.principal import Principal
from app.llm.tokens import estimate_tokens
from app.store import Refusal, SQLiteStore, Store, StoreUnavailable
from tests.store.test_store import BACKENDS, open_store

ACME = Principal(tenant="acme", key_id="k-acme-1", role="client")
ACME_VIP_KEY = Principal(tenant="acme", key_id="k-acme-vip", role="client")
GLOBEX = Principal(tenant="globex", key_id="k-globex", role="client")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 25, 23, 30, tzinfo=UTC))


def service(store: Store, clock: Clock, **policy: Any) -> BudgetService:
    return BudgetService(store, BudgetPolicy(**policy), clock=clock)


# --- sessions -------------------------------------------------------------------------------------


async def test_default_session_budget_and_lightweight_threshold(store: Store, clock: Clock) -> None:
    budget = service(store, clock)
    grant = await budget.reserve_for(ACME, "s1", 2500)
    assert isinstance(grant, Grant)
    assert (grant.remaining_tokens, grant.lightweight) == (4096, False)
    await budget.store.settle(grant.reservation, 2000 + 1100, 0.01)

    room = await budget.headroom(ACME, "s1")
    assert room.remaining_tokens == 996  # under the 1,024 threshold
    assert room.lightweight and not room.exhausted

    grant = await budget.reserve_for(ACME, "s1", 900)
    assert isinstance(grant, Grant)
    assert (grant.remaining_tokens, grant.lightweight) == (996, True)
    await budget.release(grant)

    refused = await budget.reserve_for(ACME, "s1", 1000)
    assert isinstance(refused, Refusal)
    assert (refused.scope.kind, refused.remaining_tokens) == ("session", 996)
    error = BudgetExhausted(refused)
    assert "session token budget exhausted" in str(error)
    assert error.refusal.as_dict()["error"] == "budget_exhausted"
    assert (await budget.session_budget(ACME, "s1")).used_tokens == 3100


async def test_headroom_without_any_limit_reads_nothing(
    store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no limit on the session nor the tenant's periods the answer is known: no store read
    (one per call saved); the calls are still reserved and counted."""
    reads = 0
    usages = store.usages

    async def counted(scopes: Any) -> Any:
        nonlocal reads
        reads += 1
        return await usages(scopes)

    monkeypatch.setattr(store, "usages", counted)
    unlimited = service(store, clock, session_tokens=None)
    room = await unlimited.headroom(ACME, "s1")
    assert (room.remaining_tokens, room.remaining_cost, room.lightweight) == (None, None, False)
    assert reads == 0
    assert isinstance(await unlimited.reserve_for(ACME, "s1", 100), Grant)
    assert (await unlimited.session_budget(ACME, "s1")).reserved_tokens == 100

    reads = 0
    limited = service(store, clock, tenant_limits=PeriodLimits(day_tokens=10_000))
    assert (await limited.headroom(ACME, "s2")).remaining_tokens == 4096  # the session's
    assert reads == 1


async def test_session_limit_overrides_per_tenant_and_per_key(store: Store, clock: Clock) -> None:
    budget = service(
        store,
        clock,
        session_tokens_by_tenant={"acme": 1000},
        session_tokens_by_key={"k-acme-vip": 8000},
    )
    refused = await budget.reserve_for(ACME, "a", 1001)
    assert isinstance(refused, Refusal) and refused.remaining_tokens == 1000
    assert isinstance(await budget.reserve_for(ACME_VIP_KEY, "b", 8000), Grant)
    assert isinstance(await budget.reserve_for(GLOBEX, "c", 4096), Grant)
    assert isinstance(await budget.reserve_for(GLOBEX, "d", 4097), Refusal)

    unlimited = service(store, clock, session_tokens=None)
    grant = await unlimited.reserve_for(GLOBEX, "e", 1_000_000)
    assert isinstance(grant, Grant)
    assert (grant.remaining_tokens, grant.lightweight) == (None, False)


# --- tenant periods -------------------------------------------------------------------------------


async def test_tenant_day_tokens_span_sessions_and_reset_the_next_day(
    store: Store, clock: Clock
) -> None:
    budget = service(store, clock, tenant_limits=PeriodLimits(day_tokens=5000))
    for sid in ("a", "b"):
        grant = await budget.reserve_for(ACME, sid, 2400)
        assert isinstance(grant, Grant)
        await budget.store.settle(grant.reservation, 2000 + 400, 0.0)
    refused = await budget.reserve_for(ACME, "c", 300)
    assert isinstance(refused, Refusal)
    assert (refused.scope.kind, refused.scope.id, refused.remaining_tokens) == (
        "tenant_day",
        "2026-11-25",
        200,
    )
    assert isinstance(await budget.reserve_for(GLOBEX, "c", 3000), Grant)  # not their budget

    clock.now += timedelta(hours=1)  # 00:30 the next day
    assert isinstance(await budget.reserve_for(ACME, "c", 300), Grant)
    day, month = await budget.tenant_budget(ACME)
    assert (day.scope.id, day.reserved_tokens, day.remaining_tokens) == ("2026-11-26", 300, 4700)
    assert (month.scope.id, month.used_tokens, month.reserved_tokens) == ("2026-11", 4800, 300)


async def test_tenant_month_money_limit(store: Store, clock: Clock) -> None:
    budget = service(
        store,
        clock,
        session_tokens=None,
        tenant_limits_by_tenant={"acme": PeriodLimits(month_cost=1.0)},
    )
    grant = await budget.reserve_for(ACME, "s", 1000, estimated_cost=0.6)
    assert isinstance(grant, Grant) and grant.remaining_cost == 1.0
    await budget.store.settle(grant.reservation, 900 + 50, 0.55)
    refused = await budget.reserve_for(ACME, "s", 1000, estimated_cost=0.5)
    assert isinstance(refused, Refusal)
    assert (refused.scope.kind, refused.dimension) == ("tenant_month", "cost")
    assert refused.remaining_cost == pytest.approx(0.45)
    assert "monthly budget exhausted" in refused.message
    assert isinstance(await budget.reserve_for(ACME, "s", 1000, estimated_cost=0.45), Grant)
    assert isinstance(await budget.reserve_for(GLOBEX, "s", 1000, estimated_cost=50.0), Grant)


async def test_period_keys_follow_the_policy_time_zone(store: Store, clock: Clock) -> None:
    tz = timezone(timedelta(hours=2))
    budget = service(store, clock, period_timezone=tz)
    day, month = budget.scopes_for(ACME, "s")[1:]
    assert (day.id, month.id) == ("2026-11-26", "2026-11")  # 23:30 UTC is 01:30 at UTC+2


# --- concurrency, failure and restart -------------------------------------------------------------


async def test_200_concurrent_calls_on_one_session_never_overspend(
    store: Store, clock: Clock
) -> None:
    budget = service(store, clock)

    async def call() -> bool:
        grant = await budget.reserve_for(ACME, "hot", 300)
        if isinstance(grant, Refusal):
            return False
        await asyncio.sleep(0.001)
        await budget.store.settle(grant.reservation, 200 + 100, 0.0)
        return True

    answered = sum(await asyncio.gather(*(call() for _ in range(200))))
    used = await budget.session_budget(ACME, "hot")
    assert answered == 4096 // 300
    assert used.used_tokens == answered * 300 <= 4096
    assert used.reserved_tokens == 0


async def test_release_gives_the_reservation_back(store: Store, clock: Clock) -> None:
    budget = service(store, clock)
    grant = await budget.reserve_for(ACME, "s", 4000)
    assert isinstance(grant, Grant)
    assert isinstance(await budget.reserve_for(ACME, "s", 100), Refusal)
    await budget.release(grant)
    room = await budget.headroom(ACME, "s")
    assert room.remaining_tokens == 4096


class BrokenStore:
    """Every budget operation fails as an unreachable store does."""

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("down")

    settle = release = usage = usages = reserve


async def test_store_failures(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    budget = BudgetService(BrokenStore(), clock=clock)  # type: ignore[arg-type]
    with pytest.raises(BudgetUnavailable):
        await budget.reserve_for(ACME, "s", 10)
    with pytest.raises(BudgetUnavailable):
        await budget.headroom(ACME, "s")
    async with open_store("memory", Path(".")) as real:
        grant = await BudgetService(real, clock=clock).reserve_for(ACME, "s", 10)
    assert isinstance(grant, Grant)
    # after the answer, a release that fails is logged, never raised into the response
    await budget.release(grant)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "budget release failed: down",
    ]


async def test_budgets_survive_a_restart_on_the_same_sqlite_file(
    tmp_path: Path, clock: Clock
) -> None:
    limits = PeriodLimits(day_tokens=10_000, month_cost=5.0)
    first = await SQLiteStore.open(tmp_path)
    budget = BudgetService(first, BudgetPolicy(tenant_limits=limits), clock=clock)
    grant = await budget.reserve_for(ACME, "s", 3000, estimated_cost=1.0)
    assert isinstance(grant, Grant)
    await budget.store.settle(grant.reservation, 2500 + 300, 0.75)
    await first.close()

    second = await SQLiteStore.open(tmp_path)
    try:
        budget = BudgetService(second, BudgetPolicy(tenant_limits=limits), clock=clock)
        room = await budget.headroom(ACME, "s")
        assert room.remaining_tokens == 4096 - 2800
        assert room.remaining_cost == pytest.approx(4.25)
        refused = await budget.reserve_for(ACME, "s", 1300)
        assert isinstance(refused, Refusal) and refused.remaining_tokens == 1296
    finally:
        await second.close()


# --- configuration helpers ------------------------------------------------------------------------


def test_prompt_allowance_takes_the_tighter_of_budget_and_window() -> None:
    assert prompt_allowance(3000, context_window=128_000, max_tokens=512) == 2488
    assert prompt_allowance(None, context_window=8192, max_tokens=512) == 7680
    assert prompt_allowance(100_000, context_window=8192, max_tokens=512) == 7680
    with pytest.raises(ValueError):
        prompt_allowance(None, context_window=None, max_tokens=512)


# --- fit_history ----------------------------------------------------------------------------------


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a helpful contact-center assistant."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i} " + "x" * 40})
        messages.append({"role": "assistant", "content": f"answer {i} " + "y" * 40})
    messages.append({"role": "user", "content": "the newest question, which must be answered"})
    return messages


def counter() -> tuple[list[int], Any]:
    calls: list[int] = []

    def count(messages: Sequence[Mapping[str, str]]) -> int:
        calls.append(1)
        return estimate_tokens(messages)

    return calls, count


def test_fit_history_keeps_everything_when_it_fits() -> None:
    messages = conversation(3)
    calls, count = counter()
    fit = fit_history(messages, count_tokens=count, max_prompt_tokens=10_000)
    assert fit.messages == messages and fit.dropped == 0
    assert fit.prompt_tokens == estimate_tokens(messages)
    assert len(calls) == 1


@pytest.mark.parametrize("allowance", [60, 100, 137, 150, 200, 250, 300])
def test_fit_history_drops_oldest_first_and_fits_exactly(allowance: int) -> None:
    messages = conversation(8)
    fit = fit_history(messages, count_tokens=estimate_tokens, max_prompt_tokens=allowance)
    assert fit.prompt_tokens == estimate_tokens(fit.messages) <= allowance
    # the system instruction and the newest user turn are always there
    assert fit.messages[0] == messages[0]
    assert fit.messages[-1] == messages[-1]
    # what was dropped is exactly the oldest turns after the system instruction
    assert fit.messages[1:] == messages[1 + fit.dropped :]
    # and no more than needed: keeping one more turn would not fit
    if fit.dropped:
        one_more = [messages[0], *messages[fit.dropped :]]
        assert estimate_tokens(one_more) > allowance


def test_fit_history_counts_logarithmically() -> None:
    calls, count = counter()
    fit = fit_history(conversation(100), count_tokens=count, max_prompt_tokens=500)
    assert fit.dropped > 150
    assert len(calls) <= 12


def test_fit_history_keeps_every_system_message_and_the_newest_user_turn() -> None:
    messages = [
        {"role": "system", "content": "policy " * 10},
        {"role": "user", "content": "old " * 40},
        {"role": "assistant", "content": "earlier " * 40},
        {"role": "system", "content": "context " * 10},
        {"role": "user", "content": "newest " * 10},
        {"role": "assistant", "content": "partial " * 5},  # after the newest: the turn's own
    ]
    fit = fit_history(messages, count_tokens=estimate_tokens, max_prompt_tokens=70)
    assert [m["role"] for m in fit.messages] == ["system", "system", "user", "assistant"]
    assert fit.dropped == 2


def test_fit_history_drops_a_tool_call_with_its_results_never_apart() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "first " * 30},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "result " * 30},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "next"},
        {"role": "assistant", "content": None, "tool_calls": [{**call, "id": "c2"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "now"},
    ]
    whole = estimate_tokens(messages)
    fit = fit_history(messages, count_tokens=estimate_tokens, max_prompt_tokens=whole - 40)
    kept = fit.messages
    assert kept[-3:] == messages[-3:]  # the turn under way: its call and result stay
    for i, message in enumerate(kept):  # no result without the call just before it
        if message["role"] == "tool":
            assert kept[i - 1].get("tool_calls") or kept[i - 1]["role"] == "tool"
    assert messages[3] not in kept and messages[2] not in kept


def test_fit_history_without_a_user_turn_keeps_the_newest_message() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a" * 400}]
    messages.append({"role": "assistant", "content": "b"})
    fit = fit_history(messages, count_tokens=estimate_tokens, max_prompt_tokens=20)
    assert fit.messages == [messages[0], messages[2]]


def test_fit_history_raises_when_even_the_essentials_do_not_fit() -> None:
    messages = conversation(2)
    floor = estimate_tokens([messages[0], messages[-1]])
    with pytest.raises(HistoryTooLong) as info:
        fit_history(messages, count_tokens=estimate_tokens, max_prompt_tokens=floor - 1)
    assert (info.value.needed, info.value.max_prompt_tokens) == (floor, floor - 1)
    fit = fit_history(messages, count_tokens=estimate_tokens, max_prompt_tokens=floor)
    assert fit.messages == [messages[0], messages[-1]] and fit.dropped == 4
