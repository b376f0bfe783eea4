"""One chat call, shared by /chat, /v1/chat/completions and /ws/chat.

sanitise input → system instruction (lightweight when the budget runs low) → intent cache →
plan (truncate, reserve) → LLM, streamed to the caller when asked → output guard → validate
against the caller's schema (one repair) → settle, ledger, cache. Every step that refuses raises
a typed error the surface maps to its own wire: RateLimited and BudgetExhausted (429),
HistoryTooLong (400), UnknownModel (404), BudgetUnavailable (503), UpstreamError after every
model was tried (502/504), OutputInvalid after the repair (422); a caller schema that is not JSON
Schema is SchemaInvalid (400) before anything else but the requests-per-minute count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from app.accounting.budget import BudgetExhausted
from app.cache.intent_cache import CachedAnswer
from app.cache.turn_cache import TurnCache
from app.core.deadline import Deadline
from app.core.errors import (
    CxRelayError,
    OutputInvalid,
    StreamBroken,
    UpstreamError,
    UpstreamRejected,
)
from app.llm.messages import SYSTEM_ROLES, Message, message_text, with_text
from app.llm.types import ChatRequest, ChatResult
from app.metering.context import CallContext
from app.metering.meter import Metering, Plan
from app.observability.metrics import BUDGET_EXHAUSTED, TURNS
from app.observability.request_tally import note_outcome
from app.pipelines.chat_call import ChatCall, ChatOptions, ChatOutcome, OnText
from app.pipelines.failures import failure_fields
from app.prompts.renderer import PromptRenderer
from app.safety.injection import InjectionRules
from app.safety.output_guard import OutputGuard
from app.safety.rules import SafetyRules
from app.safety.validation import (
    OutputMismatch,
    check_json_schema,
    output_problems,
    parse_json_schema_output,
    repair_messages,
)

log = logging.getLogger("cxrelay.chat")


@dataclass
class ChatPipeline:
    metering: Metering
    renderer: PromptRenderer
    safety: SafetyRules
    injection: InjectionRules
    cache: TurnCache
    options: ChatOptions
    _rendered: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    async def run(self, call: ChatCall, on_text: OnText | None = None) -> ChatOutcome:
        """Answer `call`; with `on_text`, safe text is passed on as it is produced."""
        started = time.perf_counter()
        try:
            return await self._run(call, on_text)
        except BudgetExhausted as exhausted:
            BUDGET_EXHAUSTED.labels(call.surface, exhausted.refusal.scope.kind).inc()
            _log_failure(call, exhausted, started)
            raise
        except CxRelayError as error:
            _log_failure(call, error, started)
            raise

    async def _run(self, call: ChatCall, on_text: OnText | None) -> ChatOutcome:
        started = time.perf_counter()
        deadline = Deadline.after(self.options.deadline_seconds)
        context = self.metering.context(
            call.principal, call.session_id, surface=call.surface, deadline=deadline
        )
        await self.metering.admit(context)  # RateLimited: over the key's rpm
        if call.json_schema is not None:
            check_json_schema(call.json_schema)  # SchemaInvalid: the caller's fault, nothing spent
        models = [call.model or self.options.default_model, *call.fallback_models]
        for name in models:  # UnknownModel, RequestUnsupported before anything is spent
            context.check_request(self._request(call, name, call.messages, 1))
        injection = self._sanitise(call)
        headroom = await self.metering.headroom(context)
        messages = self._with_instruction(call.messages, headroom.lightweight)
        cached = self._cached(context, call, models[0], messages)
        if cached is None and headroom.lightweight:
            # A hit costs nothing, so the lightweight instruction saves nothing on it: an answer
            # cached under the standard one (before the budget ran low) is served too.
            standard = self._with_instruction(call.messages, lightweight=False)
            if standard != messages:
                cached = self._cached(context, call, models[0], standard)
        if cached is not None:
            outcome = ChatOutcome(
                content=cached.content,
                model=cached.model,
                provider=cached.provider,
                model_used=cached.model_used or cached.model,
                cached=True,
                lightweight=headroom.lightweight,
                injection=injection,
            )
            if call.json_schema is not None:
                outcome.parsed = parse_json_schema_output(cached.content, call.json_schema)
            if on_text is not None:
                await on_text(cached.content)
            return await self._finish(context, call, outcome, started)
        last_error: UpstreamError | None = None
        for name in models:
            plan = await self.metering.plan(
                context,
                messages,
                route_name=name,
                max_tokens=call.max_tokens or self.options.max_tokens,
                remaining_tokens=headroom.remaining_tokens,
                tools=call.tools,
            )
            try:
                outcome = await self._answer(call, plan, on_text)
            except (StreamBroken, UpstreamRejected):
                raise  # half an answer is out, or the request itself is wrong: no fallback
            except UpstreamError as error:
                last_error = error
                continue
            outcome.lightweight = headroom.lightweight
            outcome.injection = injection
            self._remember(context, call, models[0], messages, outcome)
            return await self._finish(context, call, outcome, started)
        assert last_error is not None
        raise last_error

    # --- steps ---------------------------------------------------------------------------------

    def _sanitise(self, call: ChatCall) -> tuple[str, ...]:
        """Prompt-injection check of the caller's user turns and of the tool results it sends
        back (a tool's output is outside text too), in place in redact mode."""
        mode = self.options.injection_mode if "injection" in call.filters() else "off"
        found: list[str] = []
        for i, message in enumerate(call.messages):
            if message["role"] not in ("user", "tool"):
                continue
            checked = self.injection.sanitise(message_text(message), mode)
            if checked.text != message_text(message):
                call.messages[i] = with_text(message, checked.text)
            found += [name for name in checked.matches if name not in found]
        call.injection = tuple(found)
        return call.injection

    def _with_instruction(self, messages: list[Message], lightweight: bool) -> list[Message]:
        """The caller's own system message is kept; without one, ours leads (the lightweight
        one once the budget runs low)."""
        if any(m["role"] in SYSTEM_ROLES for m in messages):
            return messages
        template = (
            self.options.lightweight_template if lightweight else self.options.system_template
        )
        return [{"role": "system", "content": self._instruction(template)}, *messages]

    def _instruction(self, template: str) -> str:
        """The instructions take no variables: each is rendered once, not per call."""
        text = self._rendered.get(template)
        if text is None:
            text = self._rendered[template] = self.renderer.render(template, {})
        return text

    @staticmethod
    def _cache_qualifier(call: ChatCall) -> str:
        """What besides the conversation shapes the answer: an answer kept for a caller that
        turned an output filter off is never served to one that did not, nor one validated
        against another schema."""
        output_filters = sorted(f for f in call.filters() if f != "injection")
        qualifier = "[output filters: " + ",".join(output_filters) + "]"
        if call.json_schema is not None:
            qualifier += "\n" + json.dumps(call.json_schema, sort_keys=True)
        shaping = {
            "json_object": call.json_object,
            "tools": call.tools,
            "tool_choice": call.tool_choice,
            "parallel_tool_calls": call.parallel_tool_calls,
            "options": call.options,
            "temperature": temperature_band(call.temperature),
        }
        return qualifier + "\n" + json.dumps(shaping, sort_keys=True, default=str)

    def _cached(
        self, context: CallContext, call: ChatCall, model: str, messages: list[Message]
    ) -> CachedAnswer | None:
        """An answer cached for this very request; one longer than the caller's own max_tokens
        is not it (that caller would have got a cut answer)."""
        cached = self.cache.get(context, model, messages, self._cache_qualifier(call))
        if cached is not None and call.max_tokens and cached.completion_tokens > call.max_tokens:
            return None
        return cached

    def _remember(
        self,
        context: CallContext,
        call: ChatCall,
        model: str,
        messages: list[Message],
        outcome: ChatOutcome,
    ) -> None:
        """Only a complete, safe (and, with a schema, valid) answer is cached."""
        if outcome.blocked or outcome.finish_reason != "stop":
            return
        answer = CachedAnswer(
            outcome.content,
            outcome.provider,
            outcome.model,
            outcome.usage.prompt_tokens,
            outcome.usage.completion_tokens,
            model_used=outcome.model_used,
        )
        self.cache.put(context, model, messages, answer, self._cache_qualifier(call))

    async def _answer(self, call: ChatCall, plan: Plan, on_text: OnText | None) -> ChatOutcome:
        guard = self._guard(call)
        received: list[str] = []  # what the provider streamed, passed on or held by the guard
        try:
            result = await self._call(call, plan, guard, on_text, received)
        except BaseException as error:
            await self._abandon(call, plan, received, error)
            raise
        if on_text is not None:
            rest = guard.finish()
            if rest:
                await on_text(rest)
            content = guard.released
        else:
            content = guard.check(result.content).text
        tool_calls = guard.check_tool_calls(result.tool_calls)
        outcome = await self._settle(call, plan, result)
        outcome.content = content
        outcome.tool_calls = tool_calls
        outcome.redactions = dict(guard.redactions)
        if guard.blocked is not None:
            outcome.blocked, outcome.finish_reason = guard.blocked, "content_filter"
            outcome.content = content if on_text is not None else self.options.fallback_text
            outcome.tool_calls = ()
            return outcome
        outcome.finish_reason = result.finish_reason or "stop"
        if tool_calls and outcome.finish_reason == "stop":
            outcome.finish_reason = "tool_calls"  # some gateways say stop beside their calls
        if call.json_schema is not None and on_text is not None:
            # the text is out already: validated as it stands, never repaired
            schema = call.json_schema
            outcome.parsed = parse_json_schema_output(outcome.content, schema, streamed=True)
        elif call.json_schema is not None:
            await self._validate(call, plan, outcome)
        return outcome

    async def _abandon(
        self, call: ChatCall, plan: Plan, received: list[str], error: BaseException
    ) -> None:
        """A call that ended without an answer: release its reservation, unless the provider
        had already streamed part of one (a stream cut, the client gone), which it bills: that
        part is counted, estimated, so leaving mid-answer is never free."""
        if not received:
            await self.metering.release(plan)
            return
        provider = error.upstream if isinstance(error, UpstreamError) else ""
        await self.metering.settle_partial(plan, "".join(received), provider=provider)

    def _guard(self, call: ChatCall) -> OutputGuard:
        return OutputGuard(
            self.safety,
            call.surface,
            redact="pii" in call.filters(),
            categories=call.unsafe_categories(self.options.unsafe_categories),
        )

    async def _call(
        self,
        call: ChatCall,
        plan: Plan,
        guard: OutputGuard,
        on_text: OnText | None,
        received: list[str] | None = None,
    ) -> ChatResult:
        """The planned call on the router the call started with, within its deadline."""
        request = self._request(call, plan.route, plan.messages, plan.max_tokens)
        context = plan.context
        deadline = context.deadline
        if on_text is None:
            return await asyncio.wait_for(context.complete(request), deadline.remaining())

        async def forward(delta: str) -> None:
            if received is not None:
                received.append(delta)
            text = guard.feed(delta)
            if text:
                await on_text(text)

        return await asyncio.wait_for(
            context.complete_streamed(request, self.options.first_token_timeout, forward),
            deadline.remaining(),
        )

    def _request(
        self, call: ChatCall, route: str, messages: list[Message], max_tokens: int
    ) -> ChatRequest:
        return ChatRequest(
            messages=messages,
            model=route,
            temperature=self.options.temperature if call.temperature is None else call.temperature,
            max_tokens=max_tokens,
            json_output=call.json_schema is not None or call.json_object,
            output_schema=call.output_schema,  # the model sees the schema on the first call
            tools=call.tools,
            tool_choice=call.tool_choice,
            parallel_tool_calls=call.parallel_tool_calls,
            options=call.options,
        )

    async def _settle(self, call: ChatCall, plan: Plan, result: ChatResult) -> ChatOutcome:
        spent = await self.metering.settle(plan, result, latency_ms=result.latency_ms)
        return ChatOutcome(
            content=result.content,
            model=result.model,
            provider=result.provider,
            usage=spent.usage,
            cost=spent.cost,
            dropped=plan.dropped,
            usage_estimated=spent.estimated,
            # the trail names the configured model; the provider may echo a dated variant
            model_used=str(result.trail[-1].model) if result.trail else result.model,
        )

    async def _validate(self, call: ChatCall, plan: Plan, outcome: ChatOutcome) -> None:
        """Validate against the caller's schema; one repair call (metered like any other)."""
        assert call.json_schema is not None
        try:
            outcome.parsed = parse_json_schema_output(outcome.content, call.json_schema)
            return
        except OutputInvalid as first_invalid:
            invalid = first_invalid
            repair = repair_messages(plan.messages, invalid, call.json_schema)
        outcome.repaired = True
        again = await self.metering.plan(
            plan.context,
            repair,
            route_name=plan.route,
            max_tokens=plan.max_tokens,
            remaining_tokens=None,
        )
        guard = self._guard(call)  # the repaired answer is checked like the first one
        try:
            result = await self._call(call, again, guard, None)
        except BaseException as error:
            await self.metering.release(again)
            if isinstance(error, UpstreamError):  # the first answer stands, and it is invalid
                failed = {"path": "$", "message": f"repair call failed: {error}"}
                raise OutputMismatch(
                    "the repair call failed",
                    raw=outcome.content,
                    problems=[*output_problems(invalid), failed],
                ) from error
            raise
        second = await self._settle(call, again, result)
        outcome.usage = outcome.usage + second.usage
        outcome.cost = round(outcome.cost + second.cost, 8)
        checked = guard.check(result.content)
        for name, n in checked.redactions.items():
            outcome.redactions[name] = outcome.redactions.get(name, 0) + n
        if checked.blocked is not None:
            outcome.blocked, outcome.finish_reason = checked.blocked, "content_filter"
            outcome.content = self.options.fallback_text
            return
        outcome.content = checked.text
        outcome.parsed = parse_json_schema_output(outcome.content, call.json_schema)

    async def _finish(
        self, context: CallContext, call: ChatCall, outcome: ChatOutcome, started: float
    ) -> ChatOutcome:
        outcome.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        status = "cached" if outcome.cached else ("blocked" if outcome.blocked else "answered")
        TURNS.labels(call.surface, status).inc()
        # a blocked answer is replaced (or cut off): the caller got a 200, not what it asked for
        blocked = outcome.blocked is not None
        note_outcome("fallback" if blocked else "success", "content_filter" if blocked else "")
        if outcome.cached:
            await self.metering.record_cached(
                context,
                provider=outcome.provider,
                model=outcome.model,
                latency_ms=outcome.latency_ms,
            )
        log.info(
            "chat turn",
            extra={
                "surface": call.surface,
                "tenant": call.principal.tenant,
                "key_id": call.principal.key_id,
                "session_id": call.session_id or None,
                "status": status,
                "provider": outcome.provider,
                "model": outcome.model,
                "prompt_tokens": outcome.usage.prompt_tokens,
                "completion_tokens": outcome.usage.completion_tokens,
                "cost_usd": outcome.cost,
                "lightweight": outcome.lightweight,
                "dropped_turns": outcome.dropped,
                "prompt_injection": list(outcome.injection) or None,
                "blocked": outcome.blocked,
                "latency_ms": outcome.latency_ms,
            },
        )
        return outcome


def _log_failure(call: ChatCall, error: CxRelayError, started: float) -> None:
    """A call that ended without an answer still gets its turn line."""
    fields = failure_fields(call.surface, call.principal, call.session_id, error, started)
    log.info("chat turn failed", extra=fields)


def temperature_band(temperature: float | None) -> str:
    """Answers at nearby temperatures are alike enough to share a cache entry; answers at 0 and
    at 1.5 are not. None is the service's configured default."""
    if temperature is None:
        return "default"
    if temperature == 0:
        return "0"
    return next(
        band for limit, band in ((0.5, "low"), (1.0, "mid"), (2.0, "high")) if temperature <= limit
    )
