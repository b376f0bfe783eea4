"""Inbound limits per client key and per tenant: requests per minute, tokens per minute and
concurrent streams, so one noisy key (or tenant) cannot starve the others.

Every limit applies twice: to the key the request came with (a client key, a webhook credential)
and to its tenant, all of the tenant's keys together. The settings give the defaults
(CLIENT_RATE_LIMIT_RPM, CLIENT_RATE_LIMIT_TPM, CLIENT_MAX_CONCURRENT_STREAMS); the provider file's
`limits:` section overrides them per tenant or per key (a key named by its id, the fingerprint
the logs show), and a configuration applied through the provisioning API takes effect at once.

- Requests: `admit`, once per request (a chat request, a /ws/chat request frame, a webhook turn
  that would ask the model).
- Tokens: `charge` before each LLM call with its planned prompt + max_tokens (metering's plan),
  `settle` after it with the real usage (nothing, when the call failed), so a key is held to
  what it really spends and an estimate never keeps a minute's room blocked.
- Streams: `open_stream` for a streamed answer (SSE on /chat and /v1/chat/completions) or an
  open /ws/chat socket. The lease is given back on every way a stream ends (done, failed, the
  client gone, the server stopping), even when the request that holds it is being cancelled;
  while the stream lives it is renewed every third of LEASE_SECONDS, so one whose holder died
  without giving it back (a killed replica) frees its slot within LEASE_SECONDS.

The counts live in the store's place (app.store.counters): Redis for several replicas
(every replica sees one count), process memory otherwise. A store that cannot be reached lets
requests through (logged): the budgets, which cannot be reserved then, still refuse spending.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.credentials import TENANT_NAME, key_ids
from app.core.errors import RateLimited
from app.core.ids import new_id
from app.core.principal import Principal
from app.store.base import StoreUnavailable
from app.store.counters import Bucket, LimitCounters

log = logging.getLogger("cxrelay.limits")

Kind = Literal["rpm", "tpm", "streams"]
T = TypeVar("T")
# How long a stream's slot outlives its last renewal: the most an orphaned lease blocks a slot.
LEASE_SECONDS = 15.0
# Where the token endpoint's attempt counters live: not a tenant name, so no tenant's counter
ATTEMPTS_PLACE = "~token-endpoint"


@dataclass(frozen=True)
class AttemptLimits:
    """Failed token requests (a wrong client secret) per minute: per client_id, from every
    address together, and per source address, whatever client_id it tries; None: no limit."""

    per_client: int | None = 60
    per_address: int | None = 10
    admin_per_address: int | None = 10  # wrong admin tokens (/admin), per source address


@dataclass(frozen=True)
class Limits:
    """One key's or one tenant's limits; None is no limit."""

    rpm: int | None = None
    tpm: int | None = None
    streams: int | None = None


class LimitOverride(BaseModel):
    """A tenant's or key's own limits in the provider file: a field left out keeps the setting's
    default, `null` removes that limit."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    streams: int | None = Field(None, ge=1)

    def over(self, base: Limits) -> Limits:
        return replace(base, **{name: getattr(self, name) for name in self.model_fields_set})


class LimitsSpec(BaseModel):
    """The provider file's `limits:` section: `tenants: {name: {...}}`, `keys: {id: {...}}`."""

    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, LimitOverride] = Field(default_factory=dict)
    keys: dict[str, LimitOverride] = Field(default_factory=dict)

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenant_names(cls, value: Any) -> Any:
        """Checked before the limits themselves, so a misspelt name is named as such."""
        if not isinstance(value, dict):
            return value
        for name in value:
            if not isinstance(name, str):
                raise ValueError(f"{name!r} was read as a number: quote it (e.g. '{name}':)")
            if not TENANT_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a tenant name (letters, digits, '.', '_', '-')")
        return value

    _key_ids = field_validator("keys", mode="before")(key_ids)


@dataclass(frozen=True)
class TokenCharge:
    """Tokens taken before a call, to be settled to its real usage."""

    tenant: str
    buckets: tuple[Bucket, ...]
    tokens: int


class Live:
    """The overrides of the provider configuration in service, read now (a stream's slot, which
    is taken before a call has its context)."""


LIVE = Live()


class InboundLimiter:
    def __init__(
        self,
        counters: LimitCounters,
        defaults: Limits,
        overrides: Callable[[], LimitsSpec | None] = lambda: None,
        *,
        lease_seconds: float = LEASE_SECONDS,
        attempts: AttemptLimits = AttemptLimits(),
    ) -> None:
        self.counters = counters
        self.defaults = defaults
        self.attempts = attempts
        self._overrides = overrides  # read per request: a provisioning change applies at once
        self.lease_seconds = lease_seconds
        self._unfinished: set[asyncio.Task[None]] = set()  # leases being given back

    def finish_in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` to its end in a task of its own, which a cancelled caller cannot stop;
        `aclose` waits for it at shutdown, before the store closes."""
        task = asyncio.get_running_loop().create_task(work)
        self._unfinished.add(task)
        task.add_done_callback(self._unfinished.discard)
        return task

    async def aclose(self, timeout: float = 5.0) -> None:
        """Wait (up to `timeout`) for the leases still being given back."""
        if self._unfinished:
            await asyncio.wait(set(self._unfinished), timeout=timeout)

    def limits_for(
        self, principal: Principal, spec: LimitsSpec | Live | None = LIVE
    ) -> tuple[Limits, Limits]:
        """(the key's limits, the tenant's limits), under `spec` (a call's own snapshot of the
        provider configuration's overrides) or, by default, the configuration in service."""
        key = tenant = self.defaults
        if isinstance(spec, Live):
            spec = self._overrides()
        if spec is not None:
            if (own := spec.keys.get(principal.key_id)) is not None:
                key = own.over(key)
            if (shared := spec.tenants.get(principal.tenant)) is not None:
                tenant = shared.over(tenant)
        return key, tenant

    def _chosen(
        self, principal: Principal, kind: Kind, spec: LimitsSpec | Live | None = LIVE
    ) -> list[tuple[str, Bucket]]:
        """(scope, (counter name, limit)) of each limit of this kind that applies."""
        key, tenant = self.limits_for(principal, spec)
        chosen = []
        for scope, limits, subject in (
            ("key", key, f"k:{principal.key_id}"),
            ("tenant", tenant, "t"),
        ):
            allowed = getattr(limits, kind)
            if allowed is not None:
                chosen.append((scope, (f"{kind}:{subject}", int(allowed))))
        return chosen

    async def admit(self, principal: Principal, spec: LimitsSpec | Live | None = LIVE) -> None:
        """Count one request; RateLimited when the key or its tenant is over its rpm."""
        chosen = self._chosen(principal, "rpm", spec)
        if not chosen:
            return
        take = self.counters.take(principal.tenant, [b for _, b in chosen], 1)
        wait, index = await _counted(take, (0.0, -1))
        if index >= 0:
            raise _refusal(principal, chosen[index], "requests", wait)

    async def charge(
        self, principal: Principal, tokens: int, spec: LimitsSpec | Live | None = LIVE
    ) -> TokenCharge | None:
        """Take a call's estimated tokens; RateLimited when they do not fit this minute."""
        chosen = self._chosen(principal, "tpm", spec)
        if not chosen or tokens <= 0:
            return None
        for scope, bucket in chosen:
            if tokens > bucket[1]:  # never fits, however long the caller waits
                raise _refusal(principal, (scope, bucket), "tokens", None, tokens)
        buckets = tuple(b for _, b in chosen)
        wait, index = await _counted(
            self.counters.take(principal.tenant, buckets, tokens), (0.0, -1)
        )
        if index >= 0:
            raise _refusal(principal, chosen[index], "tokens", wait, tokens)
        return TokenCharge(principal.tenant, buckets, tokens)

    async def settle(self, charge: TokenCharge | None, used: int) -> None:
        """Replace a charge's estimate by what the call used (0 for a call that failed)."""
        if charge is not None and used != charge.tokens:
            await _counted(
                self.counters.adjust(charge.tenant, charge.buckets, used - charge.tokens), None
            )

    async def token_attempt(self, client_id: str, address: str) -> tuple[Bucket, ...]:
        """Count one token request for `client_id` from `address` before its secret is checked;
        RateLimited (with the wait) when either has used its failed attempts of the minute.
        Counting before the check bounds guesses sent at once too; `attempt_succeeded` gives a
        right secret's unit back, so only failures use the allowance. The window slides: an
        attacker who fills a client's allowance blocks it only while still guessing (one
        attempt frees every 60/per_client seconds), and one address alone cannot fill it while
        per_address is below per_client."""
        digest = hashlib.sha256(client_id.encode()).hexdigest()[:32]  # any length, any bytes
        return await self._attempt(
            "token requests",
            address,
            [
                ("client_id", f"auth:c:{digest}", self.attempts.per_client),
                ("address", f"auth:a:{address}", self.attempts.per_address),
            ],
        )

    async def admin_attempt(self, address: str) -> tuple[Bucket, ...]:
        """As `token_attempt`, for a request to /admin from `address`: the admin token is one
        secret for everyone, so only the address is limited (a limit on the token would let
        anyone lock the operators out)."""
        place = ("address", f"auth:admin:a:{address}", self.attempts.admin_per_address)
        return await self._attempt("admin requests", address, [place])

    async def _attempt(
        self, what: str, address: str, places: list[tuple[str, str, int | None]]
    ) -> tuple[Bucket, ...]:
        """Take one attempt from each limited place (scope, counter name, allowed per minute);
        RateLimited naming the first that has none left."""
        chosen = [(scope, (name, allowed)) for scope, name, allowed in places if allowed]
        if not chosen:
            return ()
        buckets = tuple(b for _, b in chosen)
        wait, index = await _counted(self.counters.take(ATTEMPTS_PLACE, buckets, 1), (0.0, -1))
        if index >= 0:
            scope, (_, allowed) = chosen[index]
            who = "this client_id" if scope == "client_id" else "this address"
            log.warning(
                f"{what} throttled after failed attempts",
                extra={"scope": scope, "remote": address, "allowed": allowed},
            )
            return_in = max(1, math.ceil(wait))
            raise RateLimited(
                f"too many failed {what} for {who} ({allowed} per minute): retry in {return_in} s",
                scope=scope,
                limit="failed_attempts",
                allowed=allowed,
                retry_after=wait,
            )
        return buckets

    async def attempt_succeeded(self, buckets: tuple[Bucket, ...]) -> None:
        """Give a successful token request's unit back: the allowance counts failures only."""
        if buckets:
            await _counted(self.counters.adjust(ATTEMPTS_PLACE, buckets, -1), None)

    async def open_stream(self, principal: Principal) -> StreamLease:
        """A concurrent-stream slot for the key and its tenant; RateLimited when one is full.
        The holder must `close` it (it is renewed in the background until then)."""
        lease = StreamLease(self, principal, tuple(self._chosen(principal, "streams")))
        await lease.renew()
        lease.keep_alive()
        return lease


class StreamLease:
    """One open stream's place, renewed in the background until `close` gives it back."""

    def __init__(
        self, limiter: InboundLimiter, principal: Principal, chosen: tuple[tuple[str, Bucket], ...]
    ) -> None:
        self._limiter, self._principal, self._chosen = limiter, principal, chosen
        self.lease_id = new_id()
        self._renewing: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closing is not None

    async def renew(self) -> None:
        """Hold the place for another LEASE_SECONDS (taking it again if it had expired);
        RateLimited when it had expired and the slot is full now."""
        if not self._chosen or self.closed:
            return
        counters, slots = self._limiter.counters, [b for _, b in self._chosen]
        lease = counters.lease(
            self._principal.tenant, slots, self.lease_id, self._limiter.lease_seconds
        )
        full = await _counted(lease, -1)
        if full >= 0:
            raise _refusal(self._principal, self._chosen[full], "streams", None)

    def keep_alive(self) -> None:
        if self._chosen and self._renewing is None and not self.closed:
            self._renewing = asyncio.get_running_loop().create_task(self._renew_until_closed())

    async def _renew_until_closed(self) -> None:
        while not self.closed:
            await asyncio.sleep(self._limiter.lease_seconds / 3)
            try:
                await self.renew()
            except RateLimited:  # it lapsed (a stalled loop) and was taken: this stream goes on
                log.warning("a stream's lapsed slot was taken by another stream meanwhile")

    async def close(self) -> None:
        """Give the place back (once). The work starts before this awaits anything and runs
        in a task of its own, so a holder being cancelled (the client hung up mid-stream, the
        server is stopping) still gives it back."""
        if self._closing is None:
            if self._renewing is not None:
                self._renewing.cancel()
            self._closing = self._limiter.finish_in_background(self._unlease())
        await asyncio.shield(self._closing)

    async def _unlease(self) -> None:
        if not self._chosen:
            return
        names = [name for _, (name, _) in self._chosen]
        counters = self._limiter.counters
        try:
            await _counted(counters.unlease(self._principal.tenant, names, self.lease_id), None)
        except Exception:  # a bug, not an outage: the lease expires by itself
            log.exception("a stream's slot could not be given back")


async def _counted(operation: Awaitable[T], otherwise: T) -> T:
    try:
        return await operation
    except StoreUnavailable as down:
        log.warning("inbound limits not counted: %s", down)
        return otherwise


_UNITS = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "streams": "streams at once",
}


def _refusal(
    principal: Principal,
    chosen: tuple[str, Bucket],
    limit: str,
    wait: float | None,
    tokens: int = 0,
) -> RateLimited:
    scope, (_, allowed) = chosen
    who = "this key" if scope == "key" else f"tenant {principal.tenant}"
    message = f"rate limit exceeded: {who} may use {allowed} {_UNITS[limit]}"
    if limit == "tokens":
        message += f" (this call needs an estimated {tokens})"
    if limit == "tokens" and wait is None:
        message += ": it can never fit, lower max_tokens or shorten the conversation"
    elif limit == "streams":
        message += ": close one first"
        wait = 1.0  # no window to wait for: a short pause before asking again
    elif wait is not None:
        message += f"; retry in {max(1, math.ceil(wait))} s"
    log.info(
        "inbound limit refused a request",
        extra={
            "tenant": principal.tenant,
            "key_id": principal.key_id,
            "scope": scope,
            "limit": limit,
        },
    )
    return RateLimited(message, scope=scope, limit=limit, allowed=allowed, retry_after=wait)
