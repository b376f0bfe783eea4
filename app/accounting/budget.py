"""Token and money budgets: per session, and per tenant per day and per month (a call without a
session, NO_SESSION, is held to its tenant's only).

A call reserves before it goes upstream (prompt + max_tokens, and its estimated cost) on every
scope at once, settles with the provider's real usage after it (together with its ledger record,
in one store write: app.accounting.ledger), and releases on failure, so
concurrent calls, on one replica or several, cannot together spend more than a budget holds: an
exhausted budget is a Refusal (a 429 with a clear body), never a silent overspend. The only way
past a limit is a settle whose real usage exceeds its own reservation (see app.store).

Limits come from `BudgetPolicy` at every call, so changing the policy applies to the next request;
the counters live in the Store. Tenant periods are calendar days and months in the policy's time
zone (UTC unless configured); a call is counted in the period it reserved in.

`fit_history` is the pure part of "truncate so it fits": it drops the oldest turns until the prompt
counts within an allowance, and never drops the system instruction or the newest user turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Generic, TypeVar

from app.core.errors import CxRelayError
from app.core.principal import Principal
from app.observability import tracing
from app.store import (
    NO_SESSION,
    BudgetScope,
    Refusal,
    Reservation,
    ScopeUsage,
    Store,
    StoreUnavailable,
)

log = logging.getLogger("cxrelay.budget")

DEFAULT_SESSION_TOKENS = 4096
DEFAULT_LIGHTWEIGHT_THRESHOLD = 1024


class BudgetExhausted(CxRelayError):
    """A budget cannot take this call: answer 429 with `refusal.as_dict()` as the body."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class BudgetUnavailable(CxRelayError):
    """The budget store could not be asked; the caller decides whether to refuse or degrade."""


class HistoryTooLong(CxRelayError):
    """Even the system instruction and the newest user turn do not fit the prompt allowance."""

    def __init__(self, needed: int, max_prompt_tokens: int) -> None:
        super().__init__(
            f"the prompt needs {needed} tokens without any history, {max_prompt_tokens} are allowed"
        )
        self.needed = needed
        self.max_prompt_tokens = max_prompt_tokens


# --- policy --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodLimits:
    """A tenant's limits per calendar day and month, in tokens and/or money; None is no limit."""

    day_tokens: int | None = None
    day_cost: float | None = None
    month_tokens: int | None = None
    month_cost: float | None = None


@dataclass(frozen=True)
class BudgetPolicy:
    """Who may spend how much. Overrides: an API key's beats its tenant's beats the default.

    A session limit of None means unlimited (the session is still counted). Tenant periods are
    always counted, limited or not, so a limit set mid-month applies to the whole month's spend.
    """

    session_tokens: int | None = DEFAULT_SESSION_TOKENS
    session_tokens_by_tenant: Mapping[str, int | None] = field(default_factory=dict)
    session_tokens_by_key: Mapping[str, int | None] = field(default_factory=dict)
    tenant_limits: PeriodLimits = field(default_factory=PeriodLimits)
    tenant_limits_by_tenant: Mapping[str, PeriodLimits] = field(default_factory=dict)
    lightweight_threshold: int = DEFAULT_LIGHTWEIGHT_THRESHOLD
    period_timezone: tzinfo = UTC

    def session_limit(self, principal: Principal) -> int | None:
        if principal.key_id in self.session_tokens_by_key:
            return self.session_tokens_by_key[principal.key_id]
        if principal.tenant in self.session_tokens_by_tenant:
            return self.session_tokens_by_tenant[principal.tenant]
        return self.session_tokens

    def period_limits(self, tenant: str) -> PeriodLimits:
        return self.tenant_limits_by_tenant.get(tenant, self.tenant_limits)

    def period_ids(self, now: datetime) -> tuple[str, str]:
        """(day, month) keys of the period `now` falls in: `2026-11-25`, `2026-11`."""
        local = now.astimezone(self.period_timezone)
        return local.strftime("%Y-%m-%d"), local.strftime("%Y-%m")

    def scopes(self, principal: Principal, session_id: str, now: datetime) -> list[BudgetScope]:
        """The scopes a call reserves on, the session first (a refusal names the first it hits);
        a call without a session (NO_SESSION) is held to its tenant's day and month only."""
        day, month = self.period_ids(now)
        limits = self.period_limits(principal.tenant)
        tenant = principal.tenant
        periods = [
            BudgetScope("tenant_day", tenant, day, limits.day_tokens, limits.day_cost),
            BudgetScope("tenant_month", tenant, month, limits.month_tokens, limits.month_cost),
        ]
        if session_id == NO_SESSION:
            return periods
        limit = self.session_limit(principal)
        return [BudgetScope("session", tenant, session_id, limit_tokens=limit), *periods]


# --- the service ---------------------------------------------------------------------------------


def _smallest(values: Sequence[Any]) -> Any:
    present = [value for value in values if value is not None]
    return min(present) if present else None


@dataclass(frozen=True)
class Grant:
    """A reservation held for one call.

    `remaining_tokens`/`remaining_cost` are what was left before this call on the tightest scope
    (None when no scope limits it); `lightweight` is True when that is under the policy's
    threshold, so the lightweight system instruction should be used.
    """

    reservation: Reservation
    remaining_tokens: int | None
    remaining_cost: float | None
    lightweight: bool

    @property
    def tokens(self) -> int:
        return self.reservation.tokens


@dataclass(frozen=True)
class Headroom:
    """What a session may still spend right now, for planning a call before reserving it."""

    remaining_tokens: int | None
    remaining_cost: float | None
    lightweight: bool

    @property
    def exhausted(self) -> bool:
        return self.remaining_tokens == 0 or self.remaining_cost == 0.0


class BudgetService:
    """Reserve before a call, release on failure (the settle is the ledger's, with the record);
    all scoped by the Principal."""

    def __init__(
        self,
        store: Store,
        policy: BudgetPolicy | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.policy = policy or BudgetPolicy()
        self._clock = clock

    def scopes_for(
        self, principal: Principal, session_id: str, now: datetime | None = None
    ) -> list[BudgetScope]:
        return self.policy.scopes(principal, session_id, now or self._clock())

    def _lightweight(self, remaining_tokens: int | None) -> bool:
        return remaining_tokens is not None and remaining_tokens < self.policy.lightweight_threshold

    async def headroom(self, principal: Principal, session_id: str) -> Headroom:
        """The tightest remaining amounts over the session and the tenant's periods. Where no
        scope has a limit the answer is known without reading the store (a read per call)."""
        scopes = self.scopes_for(principal, session_id)
        if all(s.limit_tokens is None and s.limit_cost is None for s in scopes):
            return Headroom(None, None, lightweight=False)
        try:
            usages = await self.store.usages(scopes)
        except StoreUnavailable as exc:
            raise BudgetUnavailable(str(exc)) from exc
        tokens = _smallest([u.remaining_tokens for u in usages])
        cost = _smallest([u.remaining_cost for u in usages])
        return Headroom(tokens, cost, self._lightweight(tokens))

    async def reserve_for(
        self,
        principal: Principal,
        session_id: str,
        requested_tokens: int,
        estimated_cost: float = 0.0,
    ) -> Grant | Refusal:
        """Hold `requested_tokens` (prompt + max_tokens) and `estimated_cost` on every scope."""
        scopes = self.scopes_for(principal, session_id)
        with tracing.span("budget.reserve", {"cxrelay.budget.tokens": requested_tokens}):
            try:
                outcome = await self.store.reserve(scopes, requested_tokens, estimated_cost)
            except StoreUnavailable as exc:
                raise BudgetUnavailable(str(exc)) from exc
            tracing.annotate({"cxrelay.budget.granted": not isinstance(outcome, Refusal)})
        if isinstance(outcome, Refusal):
            log.info(
                "budget refused",
                extra={
                    "tenant": principal.tenant,
                    "session_id": session_id or None,
                    "scope": outcome.scope.kind,
                    "limit": outcome.dimension,
                    "tokens": requested_tokens,
                },
            )
            return outcome
        tokens = _smallest([left for left, _ in outcome.remaining_before])
        cost = _smallest([left for _, left in outcome.remaining_before])
        return Grant(outcome, tokens, cost, self._lightweight(tokens))

    async def release(self, grant: Grant) -> None:
        """Give the reservation back (the call failed). Never raises; the TTL is the backstop."""
        with tracing.span("budget.release"):
            await _finish(self.store.release(grant.reservation), "release", grant.reservation)

    async def session_budget(self, principal: Principal, session_id: str) -> ScopeUsage:
        if session_id == NO_SESSION:
            raise ValueError("a call without a session has no session budget")
        scope = self.scopes_for(principal, session_id)[0]
        try:
            return await self.store.usage(scope)
        except StoreUnavailable as exc:
            raise BudgetUnavailable(str(exc)) from exc

    async def tenant_budget(self, principal: Principal) -> list[ScopeUsage]:
        """This day's and this month's counters and limits for the principal's tenant."""
        scopes = self.scopes_for(principal, NO_SESSION)
        try:
            return [await self.store.usage(scope) for scope in scopes]
        except StoreUnavailable as exc:
            raise BudgetUnavailable(str(exc)) from exc


async def _finish(work: Awaitable[bool], what: str, reservation: Reservation) -> None:
    """Run a release to completion even if the request is cancelled (deadline, client gone): a
    cancelled release would hold the budget until the reservation's TTL."""
    task = asyncio.ensure_future(work)

    def report(done: asyncio.Future[bool]) -> None:
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            log.error(
                "budget %s failed: %s",
                what,
                exc,
                extra={"tenant": reservation.tenant, "reservation": reservation.id},
            )

    task.add_done_callback(report)
    with contextlib.suppress(Exception):  # reported by the callback; cancellation propagates
        await asyncio.shield(task)


def prompt_allowance(
    remaining_tokens: int | None, *, context_window: int | None, max_tokens: int
) -> int:
    """Tokens the prompt may take so that prompt + max_tokens fits the budget and the window."""
    bounds = [b for b in (remaining_tokens, context_window) if b is not None]
    if not bounds:
        raise ValueError("neither a budget nor a context window bounds the prompt")
    return min(bounds) - max_tokens


# --- truncation ----------------------------------------------------------------------------------

M = TypeVar("M", bound=Mapping[str, Any])


@dataclass(frozen=True)
class FitResult(Generic[M]):
    messages: list[M]
    dropped: int
    prompt_tokens: int


def fit_history(
    messages: Sequence[M],
    *,
    count_tokens: Callable[[list[M]], int],
    max_prompt_tokens: int,
) -> FitResult[M]:
    """Drop the oldest turns until `count_tokens(messages) <= max_prompt_tokens`.

    System messages, the newest user turn and everything after it (the tool calls and results
    of the turn under way; the newest message, if none is from the user) are never dropped;
    every other message may be, oldest first, and no more are dropped than needed (counting is
    assumed not to grow when a message is removed, which lets the search bisect instead of
    counting once per dropped turn). An assistant turn that called tools goes together with the
    tool results that answer it: a result without its call is refused by every provider.
    Raises HistoryTooLong when even the kept messages alone do not fit.
    """
    items = list(messages)
    protected = {i for i, m in enumerate(items) if m.get("role") in ("system", "developer")}
    users = [i for i, m in enumerate(items) if m.get("role") == "user"]
    protected |= set(range(users[-1] if users else max(len(items) - 1, 0), len(items)))
    droppable: list[list[int]] = []  # units, oldest first
    for i, message in enumerate(items):
        if i in protected:
            continue
        if message.get("role") == "tool" and droppable and droppable[-1][-1] == i - 1:
            droppable[-1].append(i)  # a result goes with the call before it
        else:
            droppable.append([i])

    def keep(k: int) -> list[M]:
        gone = {i for unit in droppable[:k] for i in unit}
        return [m for i, m in enumerate(items) if i not in gone]

    counted = count_tokens(items)
    if counted <= max_prompt_tokens:
        return FitResult(items, 0, counted)
    floor = count_tokens(keep(len(droppable)))
    if floor > max_prompt_tokens:
        raise HistoryTooLong(floor, max_prompt_tokens)
    low, high, high_count = 0, len(droppable), floor  # keep(high) fits, keep(low) does not
    while high - low > 1:
        mid = (low + high) // 2
        mid_count = count_tokens(keep(mid))
        if mid_count <= max_prompt_tokens:
            high, high_count = mid, mid_count
        else:
            low = mid
    return FitResult(keep(high), sum(len(unit) for unit in droppable[:high]), high_count)
