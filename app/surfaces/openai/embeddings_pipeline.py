"""One embeddings call (POST /v1/embeddings), metered like a chat call.

requests per minute → the route (embedding models only: UnknownModel before anything is spent)
→ count the input tokens (texts with the model's encoding, token-id lists by their length; each
within the model's longest input, else InputTooLong) → plan: tokens per minute, and the tokens
reserved on the session (if any) and the tenant's day and month → the router (keys, retries,
fallback, circuit) inside EMBEDDINGS_DEADLINE_SECONDS → settle with the provider's usage and
the ledger record (surface `embeddings`), or release when no answer came. Each refusal is a
typed error the route maps to OpenAI's wire, as the chat pipeline's are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from app.accounting.budget import BudgetExhausted
from app.core.deadline import Deadline
from app.core.errors import CxRelayError
from app.core.principal import Principal
from app.llm.embeddings import EmbeddingRequest, EncodingFormat, Input, Vector, in_format
from app.llm.routes import Route
from app.llm.tokens import ready, text_tokens
from app.llm.types import Usage
from app.metering.meter import Metering
from app.observability.metrics import BUDGET_EXHAUSTED
from app.observability.request_tally import note_outcome
from app.pipelines.failures import failure_fields

log = logging.getLogger("cxrelay.embeddings")

SURFACE = "embeddings"


class InputTooLong(CxRelayError):
    """One input has more tokens than a model of the route takes (the caller's to shorten)."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(
            f"input[{index}] has {tokens} tokens; the model takes at most {limit} per input"
        )
        self.index = index


@dataclass(frozen=True)
class EmbeddingsCall:
    """What a caller asks for, already authenticated and parsed (inputs are never empty)."""

    principal: Principal
    session_id: str
    model: str
    inputs: tuple[Input, ...]
    dimensions: int | None = None
    encoding_format: EncodingFormat = "float"


@dataclass(frozen=True)
class EmbeddingsOutcome:
    vectors: tuple[Vector, ...]  # in the format the caller asked for, in input order
    model: str  # as the provider named it
    model_used: str  # the configured model that answered
    provider: str
    usage: Usage
    cost: float
    usage_estimated: bool
    latency_ms: float


@dataclass
class EmbeddingsPipeline:
    metering: Metering
    deadline_seconds: float

    async def run(self, call: EmbeddingsCall) -> EmbeddingsOutcome:
        started = time.perf_counter()
        try:
            return await self._run(call, started)
        except BudgetExhausted as exhausted:
            BUDGET_EXHAUSTED.labels(SURFACE, exhausted.refusal.scope.kind).inc()
            _log_failure(call, exhausted, started)
            raise
        except CxRelayError as error:
            _log_failure(call, error, started)
            raise

    async def _run(self, call: EmbeddingsCall, started: float) -> EmbeddingsOutcome:
        deadline = Deadline.after(self.deadline_seconds)
        context = self.metering.context(
            call.principal, call.session_id, surface=SURFACE, deadline=deadline
        )
        await self.metering.admit(context)  # RateLimited: over the key's rpm
        route = context.route(call.model, "embedding")
        await ready([route.targets[0].model.name])  # its encoding, loaded by the first call
        tokens = _input_tokens(call.inputs, route)
        plan = await self.metering.plan_input(context, route_name=call.model, input_tokens=tokens)
        request = EmbeddingRequest(call.model, call.inputs, call.dimensions, call.encoding_format)
        try:
            result = await asyncio.wait_for(context.embed(request), deadline.remaining())
        except BaseException:
            await self.metering.release(plan)
            raise
        spent = await self.metering.settle_input(plan, result, latency_ms=result.latency_ms)
        outcome = EmbeddingsOutcome(
            vectors=tuple(in_format(v, call.encoding_format) for v in result.vectors),
            model=result.model,
            model_used=result.trail[-1].model if result.trail else call.model,
            provider=result.provider,
            usage=spent.usage,
            cost=spent.cost,
            usage_estimated=spent.estimated,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        note_outcome("success")
        log.info(
            "embeddings call",
            extra={
                "surface": SURFACE,
                "tenant": call.principal.tenant,
                "key_id": call.principal.key_id,
                "session_id": call.session_id or None,
                "status": "answered",
                "provider": outcome.provider,
                "model": outcome.model_used,
                "inputs": len(call.inputs),
                "prompt_tokens": outcome.usage.prompt_tokens,
                "cost_usd": outcome.cost,
                "latency_ms": outcome.latency_ms,
            },
        )
        return outcome


def _input_tokens(inputs: tuple[Input, ...], route: Route) -> int:
    """The inputs' tokens, counted with the route's first model's encoding (as a chat prompt
    is); InputTooLong for the first that a model of the route would refuse."""
    model, limit = route.targets[0].model.name, route.context_window
    total = 0
    for index, item in enumerate(inputs):
        tokens = text_tokens(item, model) if isinstance(item, str) else len(item)
        if tokens > limit:
            raise InputTooLong(index, tokens, limit)
        total += tokens
    return total


def _log_failure(call: EmbeddingsCall, error: CxRelayError, started: float) -> None:
    """The call's own line for a failure."""
    fields = failure_fields(SURFACE, call.principal, call.session_id, error, started)
    log.info("embeddings call failed", extra=fields)
