"""Provider routing: a logical model name → an ordered chain of (provider, model), walked inside
the caller's deadline, with key rotation, circuit breaking, outgoing rate limits and retries.

One *pass* walks the chain. Within a provider, a key refused (401/403) is set aside and a
rate-limited key (429) cools down, and the request moves to the next key at once. The pass moves
on to the next (provider, model) on a timeout, 5xx, a connection error, a context-length error,
every key cooling, or an open circuit. A 400 that is the caller's fault ends the request: another
provider would refuse it too. When a whole pass fails with something that may pass (rate limits,
outages), tenacity backs off (honouring Retry-After) and walks the chain again while the
deadline allows. Every step is recorded as an `attempts.Attempt` on the request's trail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_any

from app.deadline import Deadline
from app.errors import (
    ContextLengthExceeded,
    StreamBroken,
    UnknownModel,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.services.llm.attempts import Attempt, ms, observe, reason, rejection
from app.services.llm.catalog import ModelSpec, ProviderConfig, resolve_key
from app.services.llm.circuit import CircuitBreaker
from app.services.llm.keys import KeyPool
from app.services.llm.ratelimit import ProviderLimiter, request_tokens
from app.services.llm.retry import MIN_ATTEMPT_SECONDS, RetryPolicy, RetryWait, WaitOutlastsDeadline
from app.services.llm.routes import ProviderRuntime, Route, Target, build_client
from app.services.llm.streaming import OnDelta, collect_stream
from app.services.llm.types import (
    ChatRequest,
    ChatResult,
    ProviderClient,
    StreamingProviderClient,
    Usage,
)
from app.services.metrics import LLM_FALLBACKS, LLM_RETRIES, TTFT

log = logging.getLogger("cxrelay.router")

# One attempt: a provider, the request as that target takes it, a timeout and a key.
Send = Callable[[ProviderClient, ChatRequest, float, str | None], Awaitable[ChatResult]]

# The longest a request waits in a provider's outgoing rate-limit queue before falling back.
MAX_QUEUE_SECONDS = 2.0


@dataclass(frozen=True)
class RouterOptions:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    failure_threshold: int = 5
    circuit_reset_seconds: float = 30.0
    key_cooldown_seconds: float = 30.0


class LLMRouter:
    """Immutable once built: applying a new configuration builds a new router and swaps it in,
    so requests in flight finish on the one they started with."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        config: ProviderConfig,
        options: RouterOptions | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        import os

        environment = os.environ if env is None else env
        self.config = config
        self._http = http
        self._options = options = options or RouterOptions()
        self.providers: dict[str, ProviderRuntime] = {}
        for spec in config.providers:
            secrets = [
                resolve_key(d, allow_literal=config.allow_literal_keys, env=environment)
                for d in spec.api_keys
            ]
            self.providers[spec.name] = ProviderRuntime(
                spec=spec,
                client=build_client(spec),
                keys=KeyPool(spec.name, secrets, default_cooldown=options.key_cooldown_seconds),
                breaker=CircuitBreaker(
                    spec.name,
                    failure_threshold=options.failure_threshold,
                    reset_seconds=options.circuit_reset_seconds,
                ),
                limiter=ProviderLimiter(spec.rpm, spec.tpm, spec.max_concurrent),
            )
        self.routes: dict[str, Route] = {}
        for route in config.routes:
            targets = tuple(
                Target(self.providers[t.provider], self._model(t.provider, t.model))
                for t in route.chain
            )
            self.routes[route.name] = Route(
                route.name, targets, route.max_tokens, route.temperature, route.context_tokens
            )

    def _model(self, provider: str, model: str) -> ModelSpec:
        return next(m for m in self.providers[provider].spec.models if m.name == model)

    def route(self, name: str) -> Route:
        """A configured route, or a model that exactly one provider serves (a one-step route)."""
        if name in self.routes:
            return self.routes[name]
        serving = [
            Target(p, m) for p in self.providers.values() for m in p.spec.models if m.name == name
        ]
        if len(serving) == 1:
            return Route(name, (serving[0],))
        raise UnknownModel(f"model {name!r} is not a configured route or provider model")

    def model_spec(self, provider: str, model: str) -> ModelSpec | None:
        """The configured model (prices, limits) behind an attempt, if it is still configured."""
        runtime = self.providers.get(provider)
        if runtime is None:
            return None
        return next((m for m in runtime.spec.models if m.name == model), None)

    def cost(self, trail: tuple[Attempt, ...], usage: Usage) -> float:
        """What a call cost at the provider file's prices for the (provider, model) that answered
        (the last step of its trail); 0 when that model is no longer configured."""
        spec = self.model_spec(trail[-1].provider, trail[-1].model) if trail else None
        if spec is None:
            return 0.0
        return round(
            usage.prompt_tokens / 1000 * spec.price_per_1k_prompt
            + usage.completion_tokens / 1000 * spec.price_per_1k_completion,
            8,
        )

    def model_names(self) -> list[str]:
        names = list(self.routes)
        for provider in self.providers.values():
            names += [m.name for m in provider.spec.models if m.name not in names]
        return names

    async def complete(self, request: ChatRequest, deadline: Deadline) -> ChatResult:
        """The whole answer in one response from the provider."""
        return await self._run(request, deadline, self._send_whole)

    async def complete_streamed(
        self,
        request: ChatRequest,
        deadline: Deadline,
        first_token_timeout: float,
        on_delta: OnDelta | None = None,
    ) -> ChatResult:
        """The answer streamed from the provider and reassembled: a slow first token or a
        stream cut mid-way counts as a failure of that (provider, model), so the route falls
        back instead of waiting out the deadline or passing on half an answer.

        With `on_delta`, each content delta is passed on as it arrives; a stream that breaks
        after that is StreamBroken, which ends the request (no retry, no fallback)."""

        async def send(
            client: ProviderClient, call: ChatRequest, timeout: float, key: str | None
        ) -> ChatResult:
            if not isinstance(client, StreamingProviderClient):
                result = await client.complete(self._http, call, timeout, key)
                if on_delta is not None and result.content:
                    await on_delta(result.content)
                return result
            return await collect_stream(
                client.stream(self._http, call, timeout, key),
                provider=client.name,
                model=call.model,
                first_token_timeout=min(first_token_timeout, timeout),
                total_timeout=timeout,
                on_delta=on_delta,
            )

        result = await self._run(request, deadline, send)
        if result.ttft_ms is not None and result.trail:
            answered = result.trail[-1]  # the configured names, not what the provider echoed
            TTFT.labels(answered.provider, answered.model).observe(result.ttft_ms / 1000)
        return result

    async def _send_whole(
        self, client: ProviderClient, call: ChatRequest, timeout: float, key: str | None
    ) -> ChatResult:
        return await client.complete(self._http, call, timeout, key)

    async def _run(self, request: ChatRequest, deadline: Deadline, send: Send) -> ChatResult:
        route = self.route(request.model)
        trail: list[Attempt] = []
        passes = 0
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, UpstreamError) and e.retryable),
            wait=RetryWait(self._options.retry),
            stop=stop_any(
                stop_after_attempt(self._options.retry.max_attempts),
                WaitOutlastsDeadline(deadline),
            ),
            reraise=True,
            before_sleep=lambda _: LLM_RETRIES.labels(route.name).inc(),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    passes += 1
                    result = await self._walk(route, request, deadline, trail, send)
        except UpstreamError as error:
            error.trail = tuple(trail)
            raise
        return replace(result, attempts=len(trail), trail=tuple(trail))

    async def _walk(
        self,
        route: Route,
        request: ChatRequest,
        deadline: Deadline,
        trail: list[Attempt],
        send: Send,
    ) -> ChatResult:
        last_error: UpstreamError = UpstreamUnavailable(
            f"route {route.name!r}: no provider could be tried", upstream=route.name
        )
        for index, target in enumerate(route.targets):
            if deadline.remaining() < MIN_ATTEMPT_SECONDS:
                raise UpstreamTimeout("deadline reached", upstream=target.provider.spec.name)
            try:
                return await self._try_target(route, target, request, deadline, trail, send)
            except StreamBroken:
                raise  # half an answer is already out: nothing else may be appended to it
            except UpstreamRejected as error:
                if not isinstance(error, ContextLengthExceeded) and error.status not in (401, 403):
                    raise  # the caller's own request is wrong: no other provider will take it
                last_error = error
            except UpstreamError as error:
                last_error = error
            if index + 1 < len(route.targets):
                LLM_FALLBACKS.labels(route.name, reason(last_error)).inc()
        raise last_error

    async def _try_target(
        self,
        route: Route,
        target: Target,
        request: ChatRequest,
        deadline: Deadline,
        trail: list[Attempt],
        send: Send,
    ) -> ChatResult:
        runtime, model = target.provider, target.model
        name = runtime.spec.name
        if not runtime.breaker.allow():
            self._note(trail, Attempt(name, model.name, "", "circuit_open"))
            raise UpstreamUnavailable(f"{name}: circuit open", upstream=name)
        call = self._for_target(route, target, request)
        tried: set[str] = set()
        rate_limited: UpstreamRateLimited | None = None
        try:
            while True:
                key = runtime.keys.acquire(tried)
                if key is None:
                    break
                tried.add(key.key_id)
                queue = min(MAX_QUEUE_SECONDS, deadline.remaining() - MIN_ATTEMPT_SECONDS)
                tokens = request_tokens(call.messages, call.max_tokens) if runtime.spec.tpm else 0
                permit = await runtime.limiter.acquire(max(0.0, queue), tokens)
                if isinstance(permit, str):  # over rpm, tpm or max_concurrent for longer
                    self._note(trail, Attempt(name, model.name, "", "local_rate_limit"))
                    raise UpstreamRateLimited(
                        f"{name}: over its configured {permit}", upstream=name, retry_after=None
                    )
                timeout = deadline.bound(runtime.spec.timeout_seconds)
                if timeout < MIN_ATTEMPT_SECONDS:
                    permit.release()
                    raise UpstreamTimeout("deadline reached", upstream=name)
                started = time.perf_counter()
                try:
                    result = await send(runtime.client, call, timeout, key.secret)
                    permit.settle(result.usage.total_tokens if result.usage_reported else None)
                except UpstreamRateLimited as error:
                    self._note(
                        trail, Attempt(name, model.name, key.key_id, "rate_limited", ms(started))
                    )
                    runtime.keys.mark_rate_limited(key, error.retry_after)
                    rate_limited = error
                    continue  # the next key at once
                except UpstreamRejected as error:
                    outcome = rejection(error)
                    self._note(trail, Attempt(name, model.name, key.key_id, outcome, ms(started)))
                    if outcome == "unauthorized":
                        runtime.keys.mark_unauthorized(key, error.status)
                        continue
                    runtime.breaker.release_trial()
                    raise
                except (
                    UpstreamUnavailable,
                    UpstreamTimeout,
                    UpstreamProtocolError,
                    StreamBroken,
                ) as error:
                    self._note(
                        trail, Attempt(name, model.name, key.key_id, reason(error), ms(started))
                    )
                    runtime.breaker.record_failure()
                    raise
                finally:
                    permit.release()
                runtime.breaker.record_success()
                self._note(trail, Attempt(name, model.name, key.key_id, "ok", ms(started)))
                return result
        finally:
            runtime.breaker.release_trial()
        if rate_limited is not None or runtime.keys.next_available_in() is not None:
            raise UpstreamRateLimited(
                f"{name}: every key is cooling down",
                upstream=name,
                retry_after=runtime.keys.next_available_in(),
            )
        raise UpstreamRejected(
            f"{name}: every API key was refused (401/403)", upstream=name, status=401
        )

    def _for_target(self, route: Route, target: Target, request: ChatRequest) -> ChatRequest:
        """The request as this (provider, model) takes it: its model name, its token limits."""
        limits = [request.max_tokens, target.model.max_tokens]
        if route.max_tokens is not None:
            limits.append(route.max_tokens)
        temperature = request.temperature if route.temperature is None else route.temperature
        return replace(
            request, model=target.model.name, max_tokens=min(limits), temperature=temperature
        )

    @staticmethod
    def _note(trail: list[Attempt], attempt: Attempt) -> None:
        trail.append(attempt)
        observe(attempt)
        log.info("llm attempt", extra=attempt.public() | {"key_id": attempt.key_id})

    async def probe_unhealthy_keys(self, timeout: float = 5.0) -> int:
        """Try every set-aside key once; a key that works again rejoins its pool."""
        restored = 0
        for runtime in self.providers.values():
            for key in runtime.keys.unhealthy():
                if await runtime.client.probe(self._http, key.secret, timeout):
                    runtime.keys.restore(key)
                    restored += 1
        return restored


class RouterSlot:
    """Holds the router in service. Swapping is one assignment: a request reads `current` once
    and keeps that router to the end, so a configuration change never splits a request."""

    def __init__(self, router: LLMRouter) -> None:
        self.current = router

    def swap(self, router: LLMRouter) -> LLMRouter:
        previous, self.current = self.current, router
        return previous
