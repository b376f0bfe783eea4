"""Retries of one provider with exponential backoff and jitter, honouring Retry-After,
all inside the caller's deadline (tenacity does the bookkeeping).

429, 5xx, timeouts and connection errors are retried; 400/401/403 are not (the same request would
fail the same way). A retry whose wait would not end before the deadline is not attempted: the
caller gets the last error at once and can answer with its fallback in time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from app.deadline import Deadline
from app.errors import UpstreamError, UpstreamRateLimited, UpstreamTimeout
from app.services.llm.openai_compat import OpenAICompatibleProvider
from app.services.llm.types import ChatRequest, ChatResult

log = logging.getLogger("cxrelay.llm")

MIN_ATTEMPT_SECONDS = 0.05


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_wait: float = 0.2
    max_wait: float = 2.0
    attempt_timeout: float = 5.0
    max_retry_after: float = 30.0


class _Wait:
    """Retry-After when the provider sends one, else exponential backoff with jitter."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._backoff = wait_exponential(multiplier=policy.initial_wait, max=policy.max_wait) + (
            wait_random(0, policy.initial_wait)
        )

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, UpstreamRateLimited) and error.retry_after is not None:
            return min(error.retry_after, self._policy.max_retry_after)
        return float(self._backoff(state))


class _WaitOutlastsDeadline(stop_base):
    """Stop when the next wait would leave no time for another attempt before the deadline."""

    def __init__(self, deadline: Deadline) -> None:
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return state.upcoming_sleep + MIN_ATTEMPT_SECONDS >= self._deadline.remaining()


async def complete_with_retries(
    provider: OpenAICompatibleProvider,
    http: httpx.AsyncClient,
    request: ChatRequest,
    deadline: Deadline,
    policy: RetryPolicy,
) -> ChatResult:
    attempts = 0
    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda e: isinstance(e, UpstreamError) and e.retryable),
        wait=_Wait(policy),
        stop=stop_any(stop_after_attempt(policy.max_attempts), _WaitOutlastsDeadline(deadline)),
        reraise=True,
        before_sleep=lambda s: log.warning(
            "llm attempt failed, retrying",
            extra={
                "provider": provider.name,
                "attempt": s.attempt_number,
                "error": type(s.outcome.exception()).__name__ if s.outcome else "",
                "wait_s": round(s.upcoming_sleep, 3),
            },
        ),
    )
    async for attempt in retrying:
        with attempt:
            attempts += 1
            timeout = deadline.bound(policy.attempt_timeout)
            if timeout < MIN_ATTEMPT_SECONDS:
                raise UpstreamTimeout("deadline reached before the attempt", upstream=provider.name)
            result = await provider.complete(http, request, timeout)
    return ChatResult(
        content=result.content,
        model=result.model,
        provider=result.provider,
        usage=result.usage,
        latency_ms=result.latency_ms,
        attempts=attempts,
    )
