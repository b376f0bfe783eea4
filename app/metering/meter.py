"""Budget-metered LLM calls, the same on every surface: plan, reserve, call, settle or release.

`plan` fits a call to what the session may still spend: it drops the oldest turns (never the
system instruction or the newest user turn) until prompt + max_tokens fits both the remaining
budget and the route's context window, shortening max_tokens when only that makes it fit, and
then reserves prompt + max_tokens (and their cost at the dearest model of the route, so a
fallback is covered) on the session and the tenant's day and month. A refusal is
BudgetExhausted: the chat surfaces answer 429, the webhooks their fallback. `settle` counts the
provider's real usage (our own count when it sent none) and writes it to the budget and the
ledger in one atomic store write that completes before the caller can answer (see
app.accounting.ledger), so a crash never leaves an answered call unrecorded or the budgets apart
from the ledger; `release` gives the reservation back when the call failed.

The same prompt + max_tokens is taken from the key's and the tenant's inbound tokens per minute
(app.accounting.inbound_limits; RateLimited when it does not fit) and settled to the real usage
with the budget (given back on release).

An embeddings call has no answer to fit: `plan_input` reserves its input tokens (and their cost
at the route's dearest input price) the same way, and `settle_input` counts the provider's
usage (our count when it sent none) into the same budgets, ledger and metrics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.accounting.budget import (
    BudgetExhausted,
    BudgetService,
    Grant,
    Headroom,
    HistoryTooLong,
    fit_history,
)
from app.accounting.inbound_limits import InboundLimiter, TokenCharge
from app.accounting.ledger import Ledger
from app.core.deadline import Deadline
from app.core.principal import Principal
from app.llm.messages import Message
from app.llm.router import RouterSlot
from app.llm.routes import Route
from app.llm.tokens import estimate_tokens, text_tokens, tool_tokens
from app.llm.types import ChatResult, Usage
from app.metering.context import CallContext
from app.observability.metrics import COST, TOKENS
from app.store import Refusal, UsageRecord

# Shortening max_tokens below this to squeeze a call into a budget would only buy a cut answer.
MIN_COMPLETION_TOKENS = 16


@dataclass(frozen=True)
class Plan:
    """One reserved call: the messages to send, how long the answer may be, what was dropped."""

    context: CallContext  # who, and the router the call was planned (and is sent and priced) on
    route: str
    messages: list[Message]
    max_tokens: int
    prompt_tokens: int  # our count of `messages`, chat framing included
    dropped: int  # history turns left out to fit
    grant: Grant
    tokens: TokenCharge | None = None  # taken from the inbound tokens-per-minute limits

    @property
    def principal(self) -> Principal:
        return self.context.principal

    @property
    def session_id(self) -> str:
        return self.context.session_id


@dataclass(frozen=True)
class Spend:
    """What a finished call used and cost, as counted and recorded."""

    usage: Usage
    cost: float
    estimated: bool


class Metering:
    """Budget reservation and usage accounting around LLM calls, shared by every surface.

    Every call starts with `context`, the one read of the router slot; each step after takes
    that context (or the Plan holding it), so one call is planned, sent and priced on one
    router whatever configuration is applied meanwhile."""

    def __init__(
        self, budget: BudgetService, ledger: Ledger, llm: RouterSlot, limits: InboundLimiter
    ) -> None:
        self.budget = budget
        self.ledger = ledger
        self.llm = llm
        self.limits = limits  # the pipelines' requests and the calls' tokens per minute

    def context(
        self, principal: Principal, session_id: str, *, surface: str, deadline: Deadline
    ) -> CallContext:
        """A call's context, on the router in service now: built once at a pipeline's entry."""
        return CallContext(principal, session_id, surface, deadline, self.llm.current)

    async def admit(self, context: CallContext) -> None:
        """RateLimited when the caller is over its requests per minute (nothing is spent), under
        the limits of the call's own configuration snapshot."""
        await self.limits.admit(context.principal, context.router.config.limits)

    async def headroom(self, context: CallContext) -> Headroom:
        return await self.budget.headroom(context.principal, context.session_id)

    async def plan(
        self,
        context: CallContext,
        messages: Sequence[Mapping[str, Any]],
        *,
        route_name: str,
        max_tokens: int,
        remaining_tokens: int | None,
        min_tokens: int = MIN_COMPLETION_TOKENS,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Plan:
        """Fit and reserve. Raises UnknownModel, HistoryTooLong (the context window is too small
        for even the kept messages) or BudgetExhausted (the budget cannot take the call).

        `remaining_tokens` (the headroom, when the caller read it) fits the call before it is
        reserved; without it, a reservation refused for tokens is squeezed to what the refusing
        budget has left and asked once more. Either way the answer is shortened, down to
        `min_tokens`, before the call is refused."""
        principal, session_id = context.principal, context.session_id
        route = context.route(route_name)
        max_tokens = _answer_limit(route, max_tokens)
        counting_model = route.targets[0].model.name

        overhead = tool_tokens(tools, counting_model)  # the definitions go with every call

        def count(candidate: list[Message]) -> int:
            return estimate_tokens(candidate, model=counting_model) + overhead

        items = [dict(m) for m in messages]
        window = route.context_window
        bound = window if remaining_tokens is None else min(window, remaining_tokens)
        try:
            fit = fit_history(items, count_tokens=count, max_prompt_tokens=bound - max_tokens)
        except HistoryTooLong as too_long:
            room = bound - too_long.needed
            if room < min_tokens:
                if too_long.needed + min_tokens > window:
                    raise HistoryTooLong(too_long.needed, window - min_tokens) from None
                minimum = too_long.needed + min_tokens
                raise BudgetExhausted(await self._refusal(principal, session_id, minimum)) from None
            max_tokens = room
            fit = fit_history(items, count_tokens=count, max_prompt_tokens=bound - max_tokens)
        answer = max_tokens

        async def reserve() -> Grant | Refusal:
            nonlocal answer
            outcome = await self._reserve(principal, session_id, route, fit.prompt_tokens, answer)
            if isinstance(outcome, Refusal) and outcome.dimension == "tokens":
                room = (outcome.remaining_tokens or 0) - fit.prompt_tokens
                if min_tokens <= room < answer:  # squeezed, then asked once more
                    answer = room
                    outcome = await self._reserve(
                        principal, session_id, route, fit.prompt_tokens, answer
                    )
            return outcome

        grant, charge = await self._held(context, fit.prompt_tokens + max_tokens, reserve)
        max_tokens = answer
        return Plan(
            context,
            route_name,
            fit.messages,
            max_tokens,
            fit.prompt_tokens,
            fit.dropped,
            grant,
            charge,
        )

    async def _held(
        self,
        context: CallContext,
        tokens: int,
        reserve: Callable[[], Awaitable[Grant | Refusal]],
    ) -> tuple[Grant, TokenCharge | None]:
        """`tokens` taken from the inbound tokens per minute (RateLimited), then the budgets'
        reservation (BudgetExhausted); a refusal or a failure gives the minute's tokens back."""
        charge = await self.limits.charge(
            context.principal, tokens, context.router.config.limits
        )
        try:
            outcome = await reserve()
        except BaseException:
            await self.limits.settle(charge, 0)
            raise
        if isinstance(outcome, Refusal):
            await self.limits.settle(charge, 0)
            raise BudgetExhausted(outcome)
        return outcome, charge

    async def _reserve(
        self, principal: Principal, session_id: str, route: Route, prompt: int, max_tokens: int
    ) -> Grant | Refusal:
        return await self.budget.reserve_for(
            principal, session_id, prompt + max_tokens, _dearest_cost(route, prompt, max_tokens)
        )

    async def _refusal(self, principal: Principal, session_id: str, requested: int) -> Refusal:
        """The store's own refusal for a call that cannot fit (it names the binding scope)."""
        outcome = await self.budget.reserve_for(principal, session_id, requested)
        if isinstance(outcome, Refusal):
            return outcome
        await self.budget.release(outcome)  # raced with a settle that freed room: still refuse
        scope = self.budget.scopes_for(principal, session_id)[0]
        return Refusal(scope, "tokens", outcome.remaining_tokens, None, requested, 0.0)

    def spend(self, plan: Plan, result: ChatResult) -> Spend:
        """The provider's usage (our count when a stream sent none) and its cost, plus what
        each broken stream the answer continued had streamed (estimated, at its own prices)."""
        context = plan.context
        usage, estimated = result.usage, False
        if not result.usage_reported:
            model = result.trail[-1].model if result.trail else result.model
            usage = Usage(
                estimate_tokens(plan.messages, model=model), text_tokens(result.content, model)
            )
            estimated = True
        cost = context.cost(result.trail, usage)
        for part in result.broken:
            billed = Usage(
                estimate_tokens(part.prompt, model=part.model), text_tokens(part.text, part.model)
            )
            usage, estimated = usage + billed, True
            cost += context.price(part.provider, part.model, billed)
        return Spend(usage, round(cost, 8), estimated)

    async def settle(self, plan: Plan, result: ChatResult, *, latency_ms: float) -> Spend:
        """Count the real usage against the budget and append the ledger record."""
        spent = self.spend(plan, result)
        answered = result.trail[-1] if result.trail else None
        provider = answered.provider if answered else result.provider
        model = answered.model if answered else plan.route  # configured names only, as priced
        await self._account(plan, spent, provider, model, latency_ms)
        return spent

    async def settle_partial(self, plan: Plan, text: str, *, provider: str = "") -> Spend:
        """A streamed answer that never completed (cut, or the caller left): the provider bills
        what it produced, so the prompt and the text received so far are counted, estimated, at
        the prices of the provider that streamed it (the route's first when unknown)."""
        route = plan.context.route(plan.route)
        target = next(
            (t for t in route.targets if t.provider.spec.name == provider), route.targets[0]
        )
        provider, model = target.provider.spec.name, target.model.name
        usage = Usage(plan.prompt_tokens, text_tokens(text, model))
        spent = Spend(usage, plan.context.price(provider, model, usage), estimated=True)
        await self._account(plan, spent, provider, model, 0.0)
        return spent

    async def _account(
        self,
        plan: Plan,
        spent: Spend,
        provider: str,
        model: str,
        latency_ms: float,
    ) -> None:
        surface = plan.context.surface
        record = UsageRecord(
            tenant=plan.principal.tenant,
            session=plan.session_id,
            surface=surface,
            provider=provider,
            model=model,
            prompt_tokens=spent.usage.prompt_tokens,
            completion_tokens=spent.usage.completion_tokens,
            cost=spent.cost,
            latency_ms=latency_ms,
            estimated=spent.estimated,
        )
        # the metrics count exactly what the ledger does: every metered call, every surface
        labels = (surface, plan.principal.tenant, provider, model)
        TOKENS.labels(*labels, "prompt").inc(spent.usage.prompt_tokens)
        TOKENS.labels(*labels, "completion").inc(spent.usage.completion_tokens)
        COST.labels(*labels).inc(spent.cost)
        # the settle and the record in one write, finished even if the request is cancelled
        await self.ledger.commit(record, plan.grant.reservation)
        await self.limits.settle(plan.tokens, spent.usage.total_tokens)

    async def release(self, plan: Plan) -> None:
        await self.budget.release(plan.grant)
        await self.limits.settle(plan.tokens, 0)

    async def plan_input(self, context: CallContext, *, route_name: str, input_tokens: int) -> Plan:
        """Reserve an embeddings call's input tokens; RateLimited or BudgetExhausted when the
        tokens per minute or a budget cannot take them."""
        principal, session_id = context.principal, context.session_id
        route = context.route(route_name, "embedding")

        async def reserve() -> Grant | Refusal:
            return await self._reserve(principal, session_id, route, input_tokens, 0)

        grant, charge = await self._held(context, input_tokens, reserve)
        return Plan(context, route_name, [], 0, input_tokens, 0, grant, charge)

    async def settle_input(self, plan: Plan, result: ChatResult, *, latency_ms: float) -> Spend:
        """Count an embeddings call: the provider's usage, else the input tokens we counted."""
        usage = result.usage if result.usage_reported else Usage(plan.prompt_tokens, 0)
        spent = Spend(usage, plan.context.cost(result.trail, usage), not result.usage_reported)
        answered = result.trail[-1] if result.trail else None
        provider = answered.provider if answered else result.provider
        model = answered.model if answered else plan.route
        await self._account(plan, spent, provider, model, latency_ms)
        return spent

    async def run(
        self, plan: Plan, send: Callable[[], Awaitable[ChatResult]]
    ) -> tuple[ChatResult, Spend]:
        """Make the planned call and settle it; any failure (a cancelled deadline included)
        gives the reservation back, so a call that was not answered costs nothing."""
        try:
            result = await send()
        except BaseException:
            await self.release(plan)
            raise
        return result, await self.settle(plan, result, latency_ms=result.latency_ms)

    async def record_cached(
        self, context: CallContext, *, provider: str, model: str, latency_ms: float
    ) -> None:
        """A cache hit spends nothing, but finance still sees that the session was answered."""
        await self.ledger.commit(
            UsageRecord(
                tenant=context.principal.tenant,
                session=context.session_id,
                surface=context.surface,
                provider=provider,
                model=model,
                prompt_tokens=0,
                completion_tokens=0,
                cost=0.0,
                cached=True,
                latency_ms=latency_ms,
            )
        )


def _answer_limit(route: Route, requested: int) -> int:
    """The longest answer every target of the route allows."""
    limits = [requested, *(t.model.max_tokens for t in route.targets)]
    if route.max_tokens is not None:
        limits.append(route.max_tokens)
    return max(1, min(limits))


def _dearest_cost(route: Route, prompt_tokens: int, max_tokens: int) -> float:
    """The call's cost if the dearest model of the route answers at full length."""
    return max(t.model.price(prompt_tokens, max_tokens) for t in route.targets)
