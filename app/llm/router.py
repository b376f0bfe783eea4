"""Provider routing: a logical model name → an ordered chain of (provider, model), walked inside
the caller's deadline, with key rotation, circuit breaking, outgoing rate limits and retries.

One *pass* walks the chain. Within a provider, a key refused (401/403) is set aside and a
rate-limited key (429) cools down, and the request moves to the next key at once. The pass moves
on to the next (provider, model) on a timeout, 5xx, a connection error, a context-length error,
every key cooling, or an open circuit. A 400 that is the caller's fault ends the request: another
provider would refuse it too. When a whole pass fails with something that may pass (rate limits,
outages), tenacity backs off (honouring Retry-After) and walks the chain again while the
deadline allows — unless every provider of the route has its circuit open: with nothing to try,
the caller gets the failure at once and answers its fallback in time. Every step is recorded as
an `attempts.Attempt` on the request's trail.

Time: an attempt ends DEADLINE_MARGIN_SECONDS before the caller's deadline, so a provider that
hangs is the router's timeout to record (the trail, the log line, the metric, the circuit), not
the caller's cancellation; while later entries of the route wait, an attempt gets at most an
even share of the time left (for a stream: until its first token), so a hang leaves the
fallback time to answer. An attempt cancelled anyway (the caller's deadline, the client gone) is
recorded too: as a timeout failure of the provider when the deadline cut it.

A stream that breaks after part of the answer went to the caller is continued by the route's
next entry (app.llm.continuation), and its text joins the same answer. Both providers
are paid: the broken part travels on the result (`ChatResult.broken`) for metering to charge.

A route serves one kind of model: chat calls are refused a route of embedding models, and
`embed` (POST /v1/embeddings) one of chat models; embeddings walk their route like a chat call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_any

from app.core.deadline import Deadline
from app.core.errors import (
    CircuitOpen,
    ContextLengthExceeded,
    RequestUnsupported,
    StreamBroken,
    UnknownModel,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.llm.anthropic_messages import ANTHROPIC_OPTIONS
from app.llm.attempts import Attempt, ms, observe, reason, rejection
from app.llm.catalog import ModelKind, ModelSpec, ProviderConfig, resolve_key
from app.llm.circuit import CircuitBreaker
from app.llm.continuation import Answered, continuation
from app.llm.embeddings import EmbeddingRequest, EmbeddingResult, embedding_client
from app.llm.keys import KeyPool
from app.llm.messages import capabilities_needed
from app.llm.ratelimit import ProviderLimiter, request_tokens
from app.llm.retry import (
    DEADLINE_MARGIN_SECONDS,
    MIN_ATTEMPT_SECONDS,
    RetryPolicy,
    RetryWait,
    WaitOutlastsDeadline,
)
from app.llm.routes import ProviderRuntime, Route, Target, build_client
from app.llm.streaming import OnDelta, collect_stream
from app.llm.types import (
    ChatRequest,
    ChatResult,
    ProviderClient,
    StreamingProviderClient,
    Usage,
)
from app.llm.wire import shown_url
from app.observability import tracing
from app.observability.metrics import LLM_FALLBACKS, LLM_RETRIES, TTFT
from app.observability.tracing import Attributes

log = logging.getLogger("cxrelay.router")

# One attempt: a provider, the request as that target takes it, its timeout (for a stream: to
# the first token and between reads), the whole attempt's time allowed, and a key.
Send = Callable[[ProviderClient, ChatRequest, float, float, str | None], Awaitable[ChatResult]]

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
                keys=KeyPool(
                    spec.name,
                    secrets,
                    default_cooldown=options.key_cooldown_seconds,
                    rotation=spec.key_rotation,
                ),
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

    def route(self, name: str, kind: ModelKind | None = "chat") -> Route:
        """A configured route, or a model that exactly one provider serves (a one-step route),
        of `kind` (None: either): a name of the other kind is refused as unknown, saying so."""
        route = self.routes.get(name)
        if route is None:
            serving = [
                Target(p, m)
                for p in self.providers.values()
                for m in p.spec.models
                if m.name == name
            ]
            wanted = [t for t in serving if t.model.kind == kind]
            if len(wanted) == 1 or len(serving) == 1:
                route = Route(name, ((wanted or serving)[0],))
            else:
                raise UnknownModel(f"model {name!r} is not a configured route or provider model")
        if kind is not None and route.kind != kind:
            raise UnknownModel(f"model {name!r} is {_a(route.kind)} model, not {_a(kind)} model")
        return route

    def check_request(self, request: ChatRequest, route: Route | None = None) -> None:
        """RequestUnsupported when no (provider, model) of the request's route (`route`, when
        the caller resolved it already) can take it; a route some of whose entries can is
        walked over those only."""
        route = self.route(request.model) if route is None else route
        reasons = [cannot_take(t, request) for t in route.targets]
        if all(reasons):
            param, what = next(r for r in reasons if r)
            models = ", ".join(f"{t.provider.spec.name}/{t.model.name}" for t in route.targets)
            raise RequestUnsupported(
                f"{what}: no model of {route.name!r} takes it ({models})", param=param
            )

    def model_spec(self, provider: str, model: str) -> ModelSpec | None:
        """The configured model (prices, limits) behind an attempt, if it is still configured."""
        runtime = self.providers.get(provider)
        if runtime is None:
            return None
        return next((m for m in runtime.spec.models if m.name == model), None)

    def cost(self, trail: tuple[Attempt, ...], usage: Usage) -> float:
        """What a call cost at the provider file's prices for the (provider, model) that answered
        (the last step of its trail); 0 when that model is no longer configured."""
        return self.price(trail[-1].provider, trail[-1].model, usage) if trail else 0.0

    def price(self, provider: str, model: str, usage: Usage) -> float:
        """`usage` at the provider file's prices for (provider, model); 0 when unconfigured."""
        spec = self.model_spec(provider, model)
        return 0.0 if spec is None else spec.price(usage.prompt_tokens, usage.completion_tokens)

    def model_names(self) -> list[str]:
        names = list(self.routes)
        for provider in self.providers.values():
            names += [m.name for m in provider.spec.models if m.name not in names]
        return names

    async def complete(
        self,
        request: ChatRequest,
        deadline: Deadline,
        trail: list[Attempt] | None = None,
        *,
        route: Route | None = None,
    ) -> ChatResult:
        """The whole answer in one response from the provider. `trail`, when given, receives
        each attempt as it ends, so a caller whose deadline cancelled the call still sees them.
        `route`: the request's route as the caller resolved it on this router (app.accounting.
        call_context), else resolved here from `request.model`."""
        return await self._run(request, deadline, self._send_whole, trail, None, route=route)

    async def complete_streamed(
        self,
        request: ChatRequest,
        deadline: Deadline,
        first_token_timeout: float,
        on_delta: OnDelta | None = None,
        trail: list[Attempt] | None = None,
        *,
        route: Route | None = None,
    ) -> ChatResult:
        """The answer streamed from the provider and reassembled: a slow first token or a
        stream cut mid-way counts as a failure of that (provider, model), so the route falls
        back instead of waiting out the deadline or passing on half an answer.

        With `on_delta`, each content delta is passed on as it arrives; a stream that breaks
        after that is continued by the route's next entry (see the module's doc), and is
        StreamBroken only when no entry is left to continue it."""
        answered = Answered(on_delta) if on_delta is not None else None
        forward = answered.forward if answered is not None else None

        async def send(
            client: ProviderClient, call: ChatRequest, timeout: float, total: float, key: str | None
        ) -> ChatResult:
            if not isinstance(client, StreamingProviderClient):
                result = await client.complete(self._http, call, timeout, key)
                if forward is not None and result.content:
                    await forward(result.content)
                return result
            return await collect_stream(
                client.stream(self._http, call, timeout, key),
                provider=client.name,
                model=call.model,
                first_token_timeout=min(first_token_timeout, timeout),
                total_timeout=max(timeout, total),
                on_delta=forward,
            )

        result = await self._run(request, deadline, send, trail, answered, route=route)
        if result.ttft_ms is not None and result.trail:
            answered_by = result.trail[-1]  # the configured names, not what the provider echoed
            TTFT.labels(answered_by.provider, answered_by.model).observe(result.ttft_ms / 1000)
        return result

    async def embed(
        self, request: EmbeddingRequest, deadline: Deadline, *, route: Route | None = None
    ) -> EmbeddingResult:
        """Embeddings from the first (provider, model) of the route named `request.model` that
        answers, with the keys, circuits, retries, fallback and deadline of a chat call."""

        async def send(
            client: ProviderClient, call: ChatRequest, timeout: float, total: float, key: str | None
        ) -> ChatResult:
            asked = replace(request, model=call.model)
            return await embedding_client(client).embed(self._http, asked, timeout, key)

        # The route is walked with a chat request whose messages are the texts: what the
        # outgoing tpm limits estimate (settled to the provider's usage after the call).
        texts = [{"role": "user", "content": t} for t in request.inputs if isinstance(t, str)]
        walked = ChatRequest(messages=texts, model=request.model, temperature=0.0, max_tokens=0)
        result = await self._run(walked, deadline, send, None, None, "embedding", route=route)
        assert isinstance(result, EmbeddingResult)
        return result

    async def _send_whole(
        self,
        client: ProviderClient,
        call: ChatRequest,
        timeout: float,
        total: float,
        key: str | None,
    ) -> ChatResult:
        return await client.complete(self._http, call, timeout, key)

    async def _run(
        self,
        request: ChatRequest,
        deadline: Deadline,
        send: Send,
        trail: list[Attempt] | None,
        answered: Answered | None,
        kind: ModelKind = "chat",
        *,
        route: Route | None = None,
    ) -> ChatResult:
        route = self.route(request.model, kind) if route is None else route
        trail = [] if trail is None else trail
        first = len(trail)  # a caller's trail may hold an earlier call's attempts

        def worth_another_pass(error: BaseException) -> bool:
            """Retryable, and some provider of the route may be tried (not every circuit open)."""
            return (
                isinstance(error, UpstreamError)
                and error.retryable
                and any(t.provider.breaker.state != "open" for t in route.targets)
            )

        def retrying() -> AsyncRetrying:
            return AsyncRetrying(
                retry=retry_if_exception(worth_another_pass),
                wait=RetryWait(self._options.retry),
                stop=stop_any(
                    stop_after_attempt(self._options.retry.max_attempts),
                    WaitOutlastsDeadline(deadline),
                ),
                reraise=True,
                before_sleep=lambda _: LLM_RETRIES.labels(route.name).inc(),
            )

        try:
            replay: UpstreamError | None = None
            try:
                result = await self._walk(route, request, deadline, trail, send, answered)
            except UpstreamError as first_failure:
                replay = first_failure
            if replay is not None:
                # tenacity only once a pass failed (most calls succeed at once, and building
                # and driving its loop cost ~2% of a call's CPU, profiled): its first attempt
                # replays that failure, so its decisions and waits are those of a loop that
                # had made the first pass itself
                async for attempt in retrying():
                    with attempt:
                        if replay is not None:
                            failure, replay = replay, None
                            raise failure
                        result = await self._walk(route, request, deadline, trail, send, answered)
        except UpstreamError as error:
            if answered is not None and answered.text and not isinstance(error, StreamBroken):
                error = StreamBroken(  # text went out: whatever ended it, the answer is cut
                    f"route {route.name!r}: the answer broke off and could not be continued: "
                    f"{error}",
                    upstream=error.upstream,
                )
            error.trail = tuple(trail[first:])
            raise error from None
        ours = tuple(trail[first:])
        if answered is not None and answered.broken:
            return replace(
                result,
                content=answered.joined(),
                attempts=len(ours),
                trail=ours,
                broken=tuple(answered.broken),
            )
        return replace(result, attempts=len(ours), trail=ours)

    async def _walk(
        self,
        route: Route,
        request: ChatRequest,
        deadline: Deadline,
        trail: list[Attempt],
        send: Send,
        answered: Answered | None,
    ) -> ChatResult:
        errors: list[UpstreamError] = []
        targets = [t for t in route.targets if cannot_take(t, request) is None]
        for index, target in enumerate(targets):
            if deadline.remaining() < MIN_ATTEMPT_SECONDS:
                raise UpstreamTimeout("deadline reached", upstream=target.provider.spec.name)
            later = len(targets) - index - 1
            try:
                return await self._try_target(
                    route, target, request, deadline, trail, send, later, answered
                )
            except StreamBroken as broken:
                if answered is None or not later:
                    raise  # nothing left to continue the answer: the caller ends it
                answered.broke(broken, target)
                error: UpstreamError = broken
            except UpstreamRejected as rejected:
                if not isinstance(rejected, ContextLengthExceeded) and rejected.status not in (
                    401,
                    403,
                ):
                    raise  # the caller's own request is wrong: no other provider will take it
                error = rejected
            except UpstreamError as failed:
                error = failed
            errors.append(error)
            if later:
                LLM_FALLBACKS.labels(route.name, reason(error)).inc()
        if not errors:
            raise UpstreamUnavailable(
                f"route {route.name!r}: no provider could be tried", upstream=route.name
            )
        # an open circuit says least about what went wrong: any other failure is reported first
        raise next((e for e in reversed(errors) if not isinstance(e, CircuitOpen)), errors[-1])

    async def _try_target(
        self,
        route: Route,
        target: Target,
        request: ChatRequest,
        deadline: Deadline,
        trail: list[Attempt],
        send: Send,
        later: int,
        answered: Answered | None,
    ) -> ChatResult:
        runtime, model = target.provider, target.model
        name = runtime.spec.name
        if not runtime.breaker.allow():
            cause = runtime.breaker.last_failure
            opened = _attempt_attributes(name, model.name, "", len(trail) + 1)
            with tracing.span("llm.attempt", opened):
                self._note(trail, Attempt(name, model.name, "", "circuit_open"), runtime, cause)
            skipped = CircuitOpen(f"{name}: circuit open", upstream=name, detail=cause)
            # half-open: a trial is testing the provider right now, worth another pass
            skipped.retryable = runtime.breaker.state == "half_open"
            raise skipped
        call = self._for_target(route, target, request, answered)
        if answered is not None:
            answered.asking = call
        tried: set[str] = set()
        rate_limited: UpstreamRateLimited | None = None
        try:
            while True:
                key = runtime.keys.acquire(tried)
                if key is None and not tried and not later:  # a fallback entry goes on at once
                    budget = deadline.remaining() - MIN_ATTEMPT_SECONDS - DEADLINE_MARGIN_SECONDS
                    key = await runtime.keys.acquire_waiting(budget)
                if key is None:
                    break
                tried.add(key.key_id)
                queue = min(MAX_QUEUE_SECONDS, deadline.remaining() - MIN_ATTEMPT_SECONDS)
                tokens = request_tokens(call.messages, call.max_tokens) if runtime.spec.tpm else 0
                permit = await runtime.limiter.acquire(max(0.0, queue), tokens)
                if isinstance(permit, str):  # over rpm, tpm or max_concurrent for longer
                    opened = _attempt_attributes(name, model.name, "", len(trail) + 1)
                    with tracing.span("llm.attempt", opened):
                        self._note(trail, Attempt(name, model.name, "", "local_rate_limit"))
                    raise UpstreamRateLimited(
                        f"{name}: over its configured {permit}", upstream=name, retry_after=None
                    )
                left = deadline.remaining() - DEADLINE_MARGIN_SECONDS
                total = min(runtime.spec.timeout_seconds, left)
                timeout = total / (later + 1)  # an even share while later entries wait
                if timeout < MIN_ATTEMPT_SECONDS:
                    permit.release()
                    raise UpstreamTimeout("deadline reached", upstream=name)
                opened = _attempt_attributes(name, model.name, key.key_id, len(trail) + 1)
                with tracing.span("llm.attempt", opened):  # the provider's parent span
                    started = time.perf_counter()
                    try:
                        result = await send(runtime.client, call, timeout, total, key.secret)
                        permit.settle(result.usage.total_tokens if result.usage_reported else None)
                        if result.usage_reported:
                            tracing.annotate(_usage_attributes(result))
                    except UpstreamRateLimited as error:
                        _trace_status(error)
                        attempt = Attempt(name, model.name, key.key_id, "rate_limited", ms(started))
                        self._note(trail, attempt)
                        runtime.keys.mark_rate_limited(key, error.retry_after)
                        rate_limited = error
                        continue  # the next key at once
                    except UpstreamRejected as error:
                        _trace_status(error)
                        outcome = rejection(error)
                        attempt = Attempt(name, model.name, key.key_id, outcome, ms(started))
                        self._note(trail, attempt)
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
                        _trace_status(error)
                        attempt = Attempt(name, model.name, key.key_id, reason(error), ms(started))
                        self._note(trail, attempt, runtime, error.for_operator())
                        runtime.breaker.record_failure(error.for_operator())
                        raise
                    except asyncio.CancelledError:
                        # the caller's deadline fired first (a stalled loop), or the caller left
                        cut = deadline.remaining() <= DEADLINE_MARGIN_SECONDS
                        outcome = "timeout" if cut else "cancelled"
                        why = f"{name}: cut by the caller's deadline" if cut else ""
                        attempt = Attempt(name, model.name, key.key_id, outcome, ms(started))
                        self._note(trail, attempt, runtime, why)
                        if cut:
                            runtime.breaker.record_failure(why)
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

    def _for_target(
        self,
        route: Route,
        target: Target,
        request: ChatRequest,
        answered: Answered | None = None,
    ) -> ChatRequest:
        """The request as this (provider, model) takes it: its model name, its token limits,
        and, when it continues a broken stream, the answer so far to go on from."""
        limits = [request.max_tokens, target.model.max_tokens]
        if route.max_tokens is not None:
            limits.append(route.max_tokens)
        temperature = request.temperature if route.temperature is None else route.temperature
        messages = request.messages
        if answered is not None and answered.text:
            messages = continuation(messages, answered.joined(), target.provider.spec.kind)
        return replace(
            request,
            model=target.model.name,
            max_tokens=min(limits),
            temperature=temperature,
            messages=messages,
        )

    @staticmethod
    def _note(
        trail: list[Attempt],
        attempt: Attempt,
        runtime: ProviderRuntime | None = None,
        error: str = "",
    ) -> None:
        """Append to the trail, count in the metrics and log: a failed attempt's line names the
        provider's URL and what went wrong, so an unreachable provider is told by the log."""
        trail.append(attempt)
        observe(attempt)
        tracing.annotate({"cxrelay.llm.outcome": attempt.outcome})  # on the attempt's span
        if attempt.outcome != "ok":
            tracing.failed(attempt.outcome)
        extra: dict[str, object] = {**attempt.public(), "key_id": attempt.key_id}
        if runtime is not None:
            extra["base_url"] = shown_url(runtime.spec.base_url)
        if error:
            extra["error"] = error
        log.info("llm attempt", extra=extra)

    async def probe_unhealthy_keys(self, timeout: float = 5.0) -> int:
        """Try every set-aside key once; a key that works again rejoins its pool."""
        restored = 0
        for runtime in self.providers.values():
            for key in runtime.keys.unhealthy():
                if await runtime.client.probe(self._http, key.secret, timeout):
                    runtime.keys.restore(key)
                    restored += 1
        return restored


def _a(kind: ModelKind) -> str:
    return "an embedding" if kind == "embedding" else "a chat"


class RouterSlot:
    """Holds the router in service. Swapping is one assignment: a request reads `current` once
    and keeps that router to the end, so a configuration change never splits a request."""

    def __init__(self, router: LLMRouter) -> None:
        self.current = router

    def swap(self, router: LLMRouter) -> LLMRouter:
        previous, self.current = self.current, router
        return previous


def _attempt_attributes(provider: str, model: str, key_id: str, number: int) -> Attributes:
    """An attempt's span: configured names and the key's fingerprint (app.auth.signatures),
    never the key; `number`: its place on the request's trail, from 1."""
    return {
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        "cxrelay.llm.key_fingerprint": key_id or "none",
        "cxrelay.llm.attempt": number,
    }


def _usage_attributes(result: ChatResult) -> Attributes:
    return {
        "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": result.usage.completion_tokens,
    }


def _trace_status(error: UpstreamError) -> None:
    """The provider's HTTP status on the attempt's span, when it answered with one."""
    if error.status is not None:
        tracing.annotate({"http.response.status_code": error.status})


def cannot_take(target: Target, request: ChatRequest) -> tuple[str, str] | None:
    """(the request field, what of it) this (provider, model) cannot take, or None."""
    model, kind = target.model, target.provider.spec.kind
    needs = capabilities_needed(request.messages)
    if "vision" in needs and not model.vision:
        return "messages", "image content parts need a model with vision: true"
    if "audio" in needs and not model.audio:
        return "messages", "input_audio content parts need a model with audio: true"
    if request.tools and not model.tools:
        return "tools", "tools need a model that takes them (tools: false in the provider file)"
    if kind == "anthropic":
        refused = sorted(set(request.options) - ANTHROPIC_OPTIONS)
        if refused:
            return refused[0], f"{', '.join(refused)} has no equivalent in Anthropic's API"
    return None
