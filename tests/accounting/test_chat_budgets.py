"""Budgets as a /chat caller meets them, over both real stores (SQLite under DATA_DIR, and the real
Redis on 127.0.0.1:6379 under a key prefix of its own, deleted afterwards; Redis being down fails
these tests, it never skips them).

The app runs its real lifespan against the simulated LLM (tests/conftest.py). The simulator
records what it received, so the prompt actually sent upstream is counted here with the same
tokenizer the service budgets with, and its usage (four characters a token, see
app/simulator/answers.py) is what the service settles.

Unless a test says otherwise, the lightweight threshold is 0 (the standard instruction whatever
the budget) and the intent cache is off, so that each call's prompt and spend are known exactly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.accounting.budget import BudgetExhausted, BudgetService, Grant
from app.core.deadline import Deadline
from app.core.principal import Principal
from app.llm.tokens import estimate_tokens
from app.metering.context import CallContext
from app.metering.meter import MIN_COMPLETION_TOKENS
from app.prompts.renderer import PromptRenderer
from app.simulator.faults import Fault, FaultPlan
from app.store import ScopeUsage
from tests.helpers import parts
from tests.store.test_store import REDIS_URL, redis_prefix

MODEL = "gpt-4o-mini"  # the default LLM_MODEL: an OpenAI model, so counts are exact (o200k_base)
KEY = "key-acme-plain-0123"
VIP_KEY = "key-acme-vip-4567"
GLOBEX_KEY = "key-globex-8910"
BACKENDS = ["sqlite", "redis"]

_RENDERER = PromptRenderer()
STANDARD = _RENDERER.render("chat_system.j2", {})
LIGHTWEIGHT = _RENDERER.render("chat_system_lightweight.j2", {})
HELLO = {"role": "user", "content": "hello there"}


def system(text: str = STANDARD) -> dict[str, str]:
    return {"role": "system", "content": text}


def count(messages: list[dict[str, str]]) -> int:
    return estimate_tokens(messages, model=MODEL)


def history(turns: int) -> list[dict[str, str]]:
    """`turns` user/assistant exchanges and then the newest user turn."""
    messages: list[dict[str, str]] = []
    for i in range(turns):
        messages.append(
            {
                "role": "user",
                "content": f"Question {i}: where is order {10_000 + i}, placed {i} days ago?",
            }
        )
        messages.append(
            {
                "role": "assistant",
                "content": f"Order {10_000 + i} left the depot and arrives in {i % 5 + 1} days.",
            }
        )
    messages.append({"role": "user", "content": "And what about the newest order?"})
    return messages


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


# --- the app under test, on either store ---------------------------------------------------------


@pytest.fixture(params=BACKENDS)
async def store_settings(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """The settings that put the app on one store; Redis under a prefix of this test only."""
    if request.param == "sqlite":
        yield {"store_backend": "sqlite"}  # DATA_DIR is the test's own tmp_path (conftest)
    else:
        async with redis_prefix() as prefix:
            yield {"store_backend": "redis", "redis_url": REDIS_URL, "redis_key_prefix": prefix}


@dataclass
class Relay:
    running: Any
    client: httpx.AsyncClient

    @property
    def services(self) -> Any:
        return parts(self.running.app)

    @property
    def budget(self) -> BudgetService:
        budget: BudgetService = self.services.metering.budget
        return budget

    def principal(self, key: str = KEY) -> Principal:
        principal: Principal = self.services.client_auth.authenticate(
            {"authorization": f"Bearer {key}"}
        )
        return principal

    def context(self, session: str, key: str = KEY) -> CallContext:
        """A /chat call's context, as the pipeline builds it at its entry."""
        context: CallContext = self.services.metering.context(
            self.principal(key), session, surface="chat", deadline=Deadline.after(30)
        )
        return context

    async def chat(
        self, session: str, messages: list[dict[str, str]], key: str = KEY, **fields: Any
    ) -> httpx.Response:
        body = {"session_id": session, "messages": messages, **fields}
        return await self.client.post("/chat", json=body, headers=auth(key))

    async def session(self, session: str, key: str = KEY) -> ScopeUsage:
        return await self.budget.session_budget(self.principal(key), session)

    async def spend(self, session: str, tokens: int, key: str = KEY, cost: float = 0.0) -> None:
        """Count `tokens` against the session (and the tenant's day and month) as a call would."""
        grant = await self.budget.reserve_for(self.principal(key), session, tokens, cost)
        assert isinstance(grant, Grant), grant
        await self.budget.store.settle(grant.reservation, tokens, cost)

    async def leave(self, session: str, remaining: int, key: str = KEY) -> None:
        """Spend so that exactly `remaining` tokens of the session's budget are left."""
        left = (await self.session(session, key)).remaining_tokens
        assert left is not None and left >= remaining
        await self.spend(session, left - remaining, key)
        assert (await self.session(session, key)).remaining_tokens == remaining


@pytest.fixture
def relay(app_client: Callable[..., Any], store_settings: dict[str, Any]) -> Callable[..., Any]:
    """`async with relay(**setting_overrides) as r:` — the app on the parametrised store."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Relay]:
        settings: dict[str, Any] = {
            "client_api_keys": [SecretStr(f"{KEY}:acme"), SecretStr(f"{GLOBEX_KEY}:globex")],
            "budget_lightweight_threshold": 0,
            "intent_cache_enabled": False,
            **store_settings,
            **overrides,
        }
        running = app_client(**settings)
        async with running as client:
            yield Relay(running, client)

    return start


def providers_file(
    tmp_path: Path,
    url: str,
    *,
    max_tokens: int = 4096,
    window: int = 128_000,
    prompt_price: float = 0.0,
    completion_price: float = 0.0,
) -> Path:
    """A PROVIDERS_FILE with one simulated provider serving MODEL through the route "small"."""
    raw = {
        "allow_literal_keys": True,
        "providers": [
            {
                "name": "sim",
                "base_url": url,
                "api_keys": ["literal:sk-test-file-key"],
                "models": [
                    {
                        "name": MODEL,
                        "max_tokens": max_tokens,
                        "max_context_tokens": window,
                        "price_per_1k_prompt": prompt_price,
                        "price_per_1k_completion": completion_price,
                    }
                ],
            }
        ],
        "routes": [{"name": "small", "chain": [{"provider": "sim", "model": MODEL}]}],
    }
    path = tmp_path / "providers.json"
    path.write_text(json.dumps(raw))
    return path


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sent(plan: FaultPlan, index: int = -1) -> dict[str, Any]:
    """The body of a request the simulated provider received."""
    body: dict[str, Any] = plan.requests[index]["body"]
    return body


def assert_fits_minimally(
    caller: list[dict[str, str]], upstream: list[dict[str, str]], max_tokens: int, bound: int
) -> int:
    """`upstream` is our system message and the newest part of `caller`, fits `bound` with
    `max_tokens`, and keeping one more (older) message would not fit. Returns the dropped count."""
    kept = len(upstream) - 1
    assert upstream[0] == system()
    assert upstream[1:] == caller[len(caller) - kept :]  # the oldest went, order is kept
    assert upstream[-1] == caller[-1]  # the newest user turn is always sent
    assert count(upstream) + max_tokens <= bound
    dropped = len(caller) - kept
    assert dropped > 0
    one_more = [system(), *caller[len(caller) - kept - 1 :]]
    assert count(one_more) + max_tokens > bound  # no more was dropped than needed
    return dropped


# --- 1. truncation ------------------------------------------------------------------------------


async def test_truncation_keeps_the_system_and_newest_turn_and_fits_the_budget(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    limit, max_tokens = 600, 100
    conversation = history(40)
    assert count([system(), *conversation]) + max_tokens > 2 * limit  # really long
    async with relay(budget_session_tokens=limit) as r:
        response = await r.chat("long", conversation, max_tokens=max_tokens)
        assert response.status_code == 200, response.text
        reply = response.json()
        body = sent(llm_plan)
        assert body["max_tokens"] == max_tokens  # the history went, the answer was not cut
        dropped = assert_fits_minimally(conversation, body["messages"], max_tokens, limit)
        assert reply["dropped_turns"] == dropped
        used = await r.session("long")
        assert used.used_tokens == reply["prompt_tokens"] + reply["completion_tokens"]
        assert used.reserved_tokens == 0
        assert len(llm_plan.requests) == 1


async def test_max_tokens_is_shortened_when_only_that_fits(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    conversation = history(6)
    floor = count([system(), conversation[-1]])  # what can never be dropped
    async with relay() as r:
        for session, room in (("at-min", 16), ("roomier", 40)):
            await r.leave(session, floor + room)
            response = await r.chat(session, conversation, max_tokens=300)
            assert response.status_code == 200, response.text
            body = sent(llm_plan)
            assert body["messages"] == [system(), conversation[-1]]
            assert body["max_tokens"] == room  # exactly what is left after the prompt
            assert response.json()["dropped_turns"] == len(conversation) - 1
            assert (await r.session(session)).reserved_tokens == 0


async def test_plan_drops_no_more_turns_than_needed(relay: Callable[..., Any]) -> None:
    """Metering.plan for every allowance from "only the kept messages fit" to "everything fits":
    the prompt it keeps fits, and one more turn (the newest of the dropped) would not."""
    messages = [system(), *history(12)]
    full, floor, max_tokens = count(messages), count([messages[0], messages[-1]]), 64
    async with relay() as r:
        metering = r.services.metering
        context = r.context("unit")
        plans = 0
        for remaining in range(floor + max_tokens, full + max_tokens + 3, 5):
            plan = await metering.plan(
                context,
                messages,
                route_name=MODEL,
                max_tokens=max_tokens,
                remaining_tokens=remaining,
            )
            await metering.release(plan)
            plans += 1
            assert plan.max_tokens == max_tokens
            assert plan.prompt_tokens == count(plan.messages)
            assert plan.prompt_tokens + max_tokens <= remaining
            assert plan.grant.tokens == plan.prompt_tokens + max_tokens
            kept = len(plan.messages) - 1
            assert plan.messages == [messages[0], *messages[len(messages) - kept :]]
            assert plan.dropped == len(messages) - 1 - kept
            if plan.dropped:
                one_more = [messages[0], *messages[len(messages) - kept - 1 :]]
                assert count(one_more) + max_tokens > remaining
            else:
                assert remaining >= full + max_tokens
        assert plans > 50
        # One token short of the kept messages plus the answer: the answer is shortened instead.
        plan = await metering.plan(
            context,
            messages,
            route_name=MODEL,
            max_tokens=max_tokens,
            remaining_tokens=floor + max_tokens - 1,
        )
        await metering.release(plan)
        assert (plan.max_tokens, plan.prompt_tokens) == (max_tokens - 1, floor)
        assert plan.dropped == len(messages) - 2
        usage = await r.session("unit")
        assert (usage.used_tokens, usage.reserved_tokens) == (0, 0)


# --- 2. the context window ----------------------------------------------------------------------


async def test_the_context_window_truncates_even_an_unlimited_budget(
    relay: Callable[..., Any], llm_plan: FaultPlan, llm_server: Any, tmp_path: Path
) -> None:
    window, model_max_tokens = 700, 100
    path = providers_file(tmp_path, llm_server.url, max_tokens=model_max_tokens, window=window)
    conversation = history(20)
    async with relay(providers_file=path, llm_model="small", budget_session_tokens="none") as r:
        response = await r.chat("windowed", conversation)
        assert response.status_code == 200, response.text
        body = sent(llm_plan)
        assert body["model"] == MODEL
        assert body["max_tokens"] == model_max_tokens  # LLM_MAX_TOKENS 1024, capped by the model
        dropped = assert_fits_minimally(conversation, body["messages"], model_max_tokens, window)
        assert response.json()["dropped_turns"] == dropped
        usage = await r.session("windowed")
        assert usage.scope.limit_tokens is None and usage.remaining_tokens is None

        too_long = {"role": "user", "content": "please read this " * 300}
        needed = count([system(), too_long])
        assert needed + 16 > window
        refused = await r.chat("windowed", [*conversation, too_long])
        assert refused.status_code == 400
        error = refused.json()
        assert error["error"] == "context_length_exceeded"
        assert f"needs {needed} tokens" in error["message"]
        assert f"{window - 16} are allowed" in error["message"]
        assert len(llm_plan.requests) == 1  # never sent
        after = await r.session("windowed")
        assert (after.used_tokens, after.reserved_tokens) == (usage.used_tokens, 0)


# --- 3. the lightweight instruction -------------------------------------------------------------


async def test_lightweight_instruction_exactly_below_the_threshold(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with relay(budget_session_tokens=3000, budget_lightweight_threshold=1000) as r:
        await r.leave("at", 1000)
        at = await r.chat("at", [HELLO], max_tokens=50)
        assert at.status_code == 200, at.text
        assert at.json()["lightweight_mode"] is False
        assert sent(llm_plan)["messages"] == [system(STANDARD), HELLO]

        await r.leave("below", 999)
        below = await r.chat("below", [HELLO], max_tokens=50)
        assert below.status_code == 200, below.text
        assert below.json()["lightweight_mode"] is True
        assert sent(llm_plan)["messages"] == [system(LIGHTWEIGHT), HELLO]

        # The caller's own system message is never replaced, only the mode is reported.
        own = [system("You answer in French."), HELLO]
        mine = await r.chat("below", own, max_tokens=50)
        assert mine.status_code == 200, mine.text
        assert mine.json()["lightweight_mode"] is True
        assert sent(llm_plan)["messages"] == own


async def test_the_first_call_of_a_small_budget_is_lightweight(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    """Threshold and budget straddling one real call: standard first, lightweight after it."""
    async with relay(budget_session_tokens=1200, budget_lightweight_threshold=1200) as r:
        first = await r.chat("fresh", [HELLO], max_tokens=50)
        assert first.json()["lightweight_mode"] is False  # 1200 left: not below 1200
        assert sent(llm_plan)["messages"][0] == system(STANDARD)
        second = await r.chat("fresh", [HELLO], max_tokens=50)
        assert second.json()["lightweight_mode"] is True
        assert sent(llm_plan)["messages"][0] == system(LIGHTWEIGHT)


# --- 4. exhausted budgets -----------------------------------------------------------------------


async def test_an_exhausted_session_is_429_with_the_numbers(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    floor = count([system(), HELLO])
    async with relay(budget_session_tokens=1000) as r:
        await r.leave("spent", floor + 15)  # one token short of the shortest answer allowed
        response = await r.chat("spent", [HELLO], max_tokens=100)
        assert response.status_code == 429
        body = response.json()
        assert body["error"] == "budget_exhausted"
        assert (body["scope"], body["scope_id"], body["limit"]) == ("session", "spent", "tokens")
        assert body["remaining_tokens"] == floor + 15
        # what the shortest answer allowed would need, not the full max_tokens
        assert body["requested_tokens"] == floor + MIN_COMPLETION_TOKENS
        assert "session token budget exhausted" in body["message"]

        await r.leave("empty", 0)
        empty = (await r.chat("empty", [HELLO])).json()
        assert (empty["error"], empty["scope"], empty["remaining_tokens"]) == (
            "budget_exhausted",
            "session",
            0,
        )
        assert empty["requested_tokens"] == floor + MIN_COMPLETION_TOKENS
        assert llm_plan.requests == []  # nothing reached the provider
        for session in ("spent", "empty"):
            assert (await r.session(session)).reserved_tokens == 0

        other = await r.chat("another-session", [HELLO], max_tokens=100)
        assert other.status_code == 200  # the session's budget, not the tenant's


async def test_a_spent_tenant_day_refuses_every_session_of_that_tenant_only(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    day = 2000
    async with relay(budget_session_tokens="none", budget_tenant_day_tokens=day) as r:
        first = await r.chat("s1", [HELLO], max_tokens=100)
        assert first.status_code == 200, first.text
        used = first.json()["prompt_tokens"] + first.json()["completion_tokens"]
        await r.spend("s1", day - used - 10)  # the rest of the day, but for 10 tokens

        for session in ("s2", "s1"):
            refused = await r.chat(session, [HELLO], max_tokens=100)
            assert refused.status_code == 429
            body = refused.json()
            assert (body["error"], body["scope"], body["scope_id"]) == (
                "budget_exhausted",
                "tenant_day",
                today(),
            )
            assert (body["remaining_tokens"], body["requested_tokens"]) == (
                10,
                count([system(), HELLO]) + MIN_COMPLETION_TOKENS,
            )
        assert len(llm_plan.requests) == 1

        globex = await r.chat("s2", [HELLO], key=GLOBEX_KEY, max_tokens=100)
        assert globex.status_code == 200, globex.text
        day_usage, month_usage = await r.budget.tenant_budget(r.principal())
        assert (day_usage.used_tokens, day_usage.reserved_tokens) == (day - 10, 0)
        assert month_usage.used_tokens == day - 10  # counted, though the month is unlimited


async def test_a_spent_tenant_month_cost_refuses_the_tenant(
    relay: Callable[..., Any], llm_plan: FaultPlan, llm_server: Any, tmp_path: Path
) -> None:
    prompt_price, completion_price, max_tokens = 0.5, 1.5, 100  # USD per 1,000 tokens
    path = providers_file(
        tmp_path, llm_server.url, prompt_price=prompt_price, completion_price=completion_price
    )
    prompt = count([system(), HELLO])
    held = prompt / 1000 * prompt_price + max_tokens / 1000 * completion_price  # a call's hold
    month = round(held + 0.01, 6)  # room for one call; after it, for a call's hold no more
    async with relay(providers_file=path, llm_model="small", budget_tenant_month_cost=month) as r:
        first = await r.chat("m1", [HELLO], max_tokens=max_tokens)
        assert first.status_code == 200, first.text
        cost = first.json()["cost"]
        expected = (
            first.json()["prompt_tokens"] / 1000 * prompt_price
            + first.json()["completion_tokens"] / 1000 * completion_price
        )
        assert cost == pytest.approx(expected, abs=1e-6) and cost > 0.01

        for session in ("m2", "m1"):
            refused = await r.chat(session, [HELLO], max_tokens=max_tokens)
            assert refused.status_code == 429
            body = refused.json()
            assert (body["error"], body["scope"], body["scope_id"], body["limit"]) == (
                "budget_exhausted",
                "tenant_month",
                this_month(),
                "cost",
            )
            assert body["remaining_cost"] == pytest.approx(month - cost, abs=2e-6)
            assert body["requested_cost"] == pytest.approx(held, abs=2e-6)
            assert body["requested_tokens"] == prompt + max_tokens
            assert "monthly budget exhausted" in body["message"]
        assert len(llm_plan.requests) == 1

        globex = await r.chat("m2", [HELLO], key=GLOBEX_KEY, max_tokens=max_tokens)
        assert globex.status_code == 200, globex.text
        _, month_usage = await r.budget.tenant_budget(r.principal())
        assert month_usage.used_cost == pytest.approx(cost, abs=1e-6)
        assert month_usage.reserved_cost_micros == 0


# --- 5. a key's own budget ------------------------------------------------------------------------


async def test_a_keys_own_budget_beats_the_tenant_and_default_ones(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    keys = [f"{VIP_KEY}:acme:3000", f"{KEY}:acme", f"{GLOBEX_KEY}:globex"]
    prompt = count([system(), HELLO])
    async with relay(
        client_api_keys=[SecretStr(k) for k in keys],
        budget_session_tokens=400,
        budget_session_tokens_by_tenant="acme=600",
    ) as r:
        for key, limit, answer in (
            (VIP_KEY, 3000, 1000),  # its own 3,000: the whole 1,000 asked for
            (KEY, 600, 600 - prompt),  # the tenant's 600
            (GLOBEX_KEY, 400, 400 - prompt),  # the default 400
        ):
            response = await r.chat(f"s-{limit}", [HELLO], key=key, max_tokens=1000)
            assert response.status_code == 200, response.text
            assert sent(llm_plan)["max_tokens"] == answer
            usage = await r.session(f"s-{limit}", key)
            assert usage.scope.limit_tokens == limit
            assert usage.used_tokens == (
                response.json()["prompt_tokens"] + response.json()["completion_tokens"]
            )
        # The tenant's other key on the VIP key's session: the limit follows the key.
        assert (await r.session("s-3000", KEY)).remaining_tokens == 600 - (
            await r.session("s-3000", VIP_KEY)
        ).used_tokens


# --- 6. concurrency ------------------------------------------------------------------------------


async def test_concurrent_calls_on_one_session_never_overspend(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    limit, max_tokens, calls = 3000, 40, 200
    question = [{"role": "user", "content": "hi"}]
    prompt = count([system(), question[0]])
    async with relay(budget_session_tokens=limit) as r:
        responses = await asyncio.gather(
            *(r.chat("busy", question, max_tokens=max_tokens) for _ in range(calls))
        )
        answered = [x.json() for x in responses if x.status_code == 200]
        refused = [x.json() for x in responses if x.status_code != 200]
        assert len(answered) + len(refused) == calls
        assert answered and refused
        assert {x.status_code for x in responses} == {200, 429}
        for body in refused:
            assert (body["error"], body["scope"], body["scope_id"]) == (
                "budget_exhausted",
                "session",
                "busy",
            )
        per_call = {a["prompt_tokens"] + a["completion_tokens"] for a in answered}
        assert len(per_call) == 1  # the same question, the same spend
        spend = per_call.pop()
        assert len(llm_plan.requests) == len(answered)  # the refused never went upstream
        for request in llm_plan.requests:
            # The premise of "never over": no call used more than it reserved.
            assert 16 <= request["body"]["max_tokens"] <= max_tokens
            assert spend <= count(request["body"]["messages"]) + request["body"]["max_tokens"]
            assert count(request["body"]["messages"]) == prompt

        usage = await r.session("busy")
        assert usage.used_tokens == len(answered) * spend <= limit
        assert usage.reserved_tokens == 0
        assert await r.services.ledger.flush(5.0)
        summary = (await r.client.get("/budget/sessions/busy", headers=auth(KEY))).json()
        assert (summary["calls"], summary["total_tokens"]) == (len(answered), usage.used_tokens)


# --- 7. failures give the reservation back -------------------------------------------------------


async def test_an_upstream_failure_releases_the_reservation(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with relay(llm_max_attempts=1) as r:
        ok = await r.chat("flaky", [HELLO], max_tokens=100)
        assert ok.status_code == 200, ok.text
        before = await r.session("flaky")
        assert before.used_tokens > 0

        llm_plan.push(*[Fault(status=500)] * 3)
        failed = await r.chat("flaky", [HELLO], max_tokens=100)
        assert failed.status_code == 502
        assert failed.json()["error"] == "upstream_unavailable"
        assert len(llm_plan.requests) == 2  # one attempt, as configured
        after = await r.session("flaky")
        assert (after.used_tokens, after.reserved_tokens) == (before.used_tokens, 0)
        day, month = await r.budget.tenant_budget(r.principal())
        assert (day.reserved_tokens, month.reserved_tokens) == (0, 0)
        assert (day.used_tokens, month.used_tokens) == (before.used_tokens, before.used_tokens)
        assert await r.services.ledger.flush(5.0)
        summary = (await r.client.get("/budget/sessions/flaky", headers=auth(KEY))).json()
        assert summary["calls"] == 1  # the failure is not billed
        llm_plan.reset()


# --- 8. a restart ------------------------------------------------------------------------------


async def test_a_restart_keeps_the_ledger_and_the_remaining_budget(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    floor = count([system(), HELLO])
    settings = {"budget_session_tokens": 2000}
    async with relay(**settings) as r:
        replies = [(await r.chat("kept", [HELLO], max_tokens=100)).json() for _ in range(3)]
        assert all(reply["response"] for reply in replies)
        await r.leave("kept", floor + 10)  # too little for the shortest answer allowed
        assert (await r.chat("kept", [HELLO])).status_code == 429
        before = await r.session("kept")
        days_before = await r.budget.tenant_budget(r.principal())
        assert await r.services.ledger.flush(5.0)
        usage_before = (await r.client.get("/budget/usage", headers=auth(KEY))).json()
        summary_before = (await r.client.get("/budget/sessions/kept", headers=auth(KEY))).json()
    assert len(usage_before["records"]) == 3

    async with relay(**settings) as again:  # a new app: same DATA_DIR, same Redis prefix
        usage_after = (await again.client.get("/budget/usage", headers=auth(KEY))).json()
        assert usage_after["records"] == usage_before["records"]
        summary = (await again.client.get("/budget/sessions/kept", headers=auth(KEY))).json()
        assert summary == summary_before
        assert summary["calls"] == 3
        assert summary["total_tokens"] == sum(
            reply["prompt_tokens"] + reply["completion_tokens"] for reply in replies
        )
        assert await again.session("kept") == before
        assert await again.budget.tenant_budget(again.principal()) == days_before
        refused = await again.chat("kept", [HELLO], max_tokens=100)
        assert refused.status_code == 429
        assert refused.json()["remaining_tokens"] == floor + 10
        assert len(llm_plan.requests) == 3


# --- 9. the intent cache -----------------------------------------------------------------------


async def test_a_cache_hit_costs_nothing_even_with_the_budget_exhausted(
    relay: Callable[..., Any], llm_plan: FaultPlan, llm_server: Any, tmp_path: Path
) -> None:
    path = providers_file(tmp_path, llm_server.url, prompt_price=0.5, completion_price=1.5)
    faq = [system("You answer questions about our shipping policy."), HELLO]
    async with relay(
        providers_file=path,
        llm_model="small",
        intent_cache_enabled=True,
        budget_session_tokens=1000,
        budget_lightweight_threshold=500,
    ) as r:
        first = await r.chat("faq", faq, max_tokens=100)
        assert first.status_code == 200 and first.json()["cached"] is False
        assert first.json()["cost"] > 0
        await r.leave("faq", 0)
        spent = await r.session("faq")
        other = await r.chat("faq", [faq[0], {"role": "user", "content": "something new"}])
        assert other.status_code == 429  # exhausted for anything the cache cannot answer

        hit = await r.chat("faq", faq, max_tokens=100)
        assert hit.status_code == 200, hit.text
        body = hit.json()
        assert body["cached"] is True
        assert body["response"] == first.json()["response"]
        assert (body["prompt_tokens"], body["completion_tokens"], body["cost"]) == (0, 0, 0.0)
        assert len(llm_plan.requests) == 1
        assert await r.session("faq") == spent  # nothing reserved or spent

        assert await r.services.ledger.flush(5.0)
        records = (await r.client.get("/budget/usage?session=faq", headers=auth(KEY))).json()
        newest, oldest = records["records"]
        assert (newest["cached"], newest["cost"], newest["total_tokens"]) == (True, 0.0, 0)
        assert (oldest["cached"], oldest["cost"]) == (False, first.json()["cost"])
        summary = (await r.client.get("/budget/sessions/faq", headers=auth(KEY))).json()
        assert (summary["calls"], summary["cached_calls"]) == (2, 1)
        assert summary["cost"] == first.json()["cost"]


async def test_an_answer_cached_before_the_budget_ran_low_is_served_once_exhausted(
    relay: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    """With our instruction, an exhausted session is in lightweight mode (0 left is under any
    threshold); the answer cached under the standard instruction is still served, for free."""
    async with relay(intent_cache_enabled=True, budget_lightweight_threshold=1024) as r:
        first = await r.chat("repeat", [HELLO], max_tokens=100)
        assert first.status_code == 200 and first.json()["lightweight_mode"] is False
        assert sent(llm_plan)["messages"][0] == system(STANDARD)
        await r.leave("repeat", 0)
        spent = await r.session("repeat")

        hit = await r.chat("repeat", [HELLO], max_tokens=100)
        assert hit.status_code == 200, hit.text
        body = hit.json()
        assert (body["cached"], body["lightweight_mode"], body["cost"]) == (True, True, 0.0)
        assert (body["prompt_tokens"], body["completion_tokens"]) == (0, 0)
        assert body["response"] == first.json()["response"]
        assert len(llm_plan.requests) == 1
        assert await r.session("repeat") == spent

        new = await r.chat("repeat", [{"role": "user", "content": "something new"}])
        assert new.status_code == 429  # nothing cached for that: the budget still decides


async def test_plan_refuses_an_exhausted_session_with_the_store_refusal(
    relay: Callable[..., Any],
) -> None:
    """Metering.plan itself: no room for even the shortest answer is BudgetExhausted naming the
    session, with what the store has left and what the call needed."""
    messages = [system(), HELLO]
    floor = count(messages)
    async with relay(budget_session_tokens=1000) as r:
        await r.leave("unit-spent", floor + 15)
        with pytest.raises(BudgetExhausted) as caught:
            await r.services.metering.plan(
                r.context("unit-spent"),
                messages,
                route_name=MODEL,
                max_tokens=64,
                remaining_tokens=floor + 15,
            )
        refusal = caught.value.refusal
        assert (refusal.scope.kind, refusal.remaining_tokens, refusal.requested_tokens) == (
            "session",
            floor + 15,
            floor + MIN_COMPLETION_TOKENS,
        )
        assert (await r.session("unit-spent")).reserved_tokens == 0
