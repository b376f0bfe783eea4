"""Prometheus collectors, and their exposition with one process or several.

Names are stable (documented in docs/operations.md, "Metrics"); labels are bounded: surface,
outcome, reason, kind and scope come from fixed vocabularies, provider, model and route from the
configuration (the configured model name, never the string a provider echoes back), tenant from the
operator's client keys; never a session id, a key or a customer's text.

With several worker processes (WORKERS > 1), prometheus-client's multiprocess mode keeps each
process's values in files under PROMETHEUS_MULTIPROC_DIR (the variable must be set before this
module is first imported), and `exposition` adds them up, so a scrape that reaches any worker
sees the whole service.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# --- requests, by the surface they came in on ----------------------------------------------------
REQUESTS = Counter(
    "cxrelay_requests_total",
    "Requests to a product surface by outcome: success, fallback (reason: the fallback), "
    "rejected (reason: the 4xx status) or error (reason: the 5xx status)",
    ["surface", "outcome", "reason"],
)
TURN_LATENCY = Histogram(
    "cxrelay_request_latency_seconds",
    "Time to answer a request that was not rejected (success, fallback, error), by surface",
    ["surface"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34),
)
TURNS = Counter(
    "cxrelay_turns_total",
    "Answered webhook and chat turns by what they did (answered, cached, handoff, fallback ...)",
    ["surface", "outcome"],
)
BUDGET_EXHAUSTED = Counter(
    "cxrelay_budget_exhausted_total",
    "Calls refused because a budget could not take them, by surface and the refusing scope",
    ["surface", "scope"],
)
# A failed credential attempt on any route. route: the route's template path (`/budget/sessions/
# {session_id}`, never the path a caller sent); reason: one of AUTH_FAILURE_REASONS.
AUTH_FAILURE_REASONS = (
    "missing",
    "invalid",
    "malformed",
    "expired",
    "replayed",
    "disabled",
    "scope",  # a known credential without the scope the route asks for (403)
)
AUTH_FAILURES = Counter(
    "cxrelay_auth_failures_total",
    "Failed credential attempts by route and reason (missing, invalid, malformed, expired, "
    "replayed, disabled, scope)",
    ["route", "reason"],
)

# --- spend -------------------------------------------------------------------------------------
TOKENS = Counter(
    "cxrelay_tokens_total",
    "Tokens metered by surface, tenant, provider, model and kind (prompt, completion)",
    ["surface", "tenant", "provider", "model", "kind"],
)
COST = Counter(
    "cxrelay_cost_usd_total",
    "Money spent at the provider file's prices, by surface, tenant, provider and model",
    ["surface", "tenant", "provider", "model"],
)

# --- upstream LLM providers ------------------------------------------------------------------
LLM_ATTEMPTS = Counter(
    "cxrelay_llm_attempts_total",
    "Upstream LLM attempts by provider, model and outcome",
    ["provider", "model", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "cxrelay_upstream_latency_seconds",
    "Time of one upstream LLM call, by provider, model and outcome",
    ["provider", "model", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21),
)
TTFT = Histogram(
    "cxrelay_time_to_first_token_seconds",
    "Time from a streamed upstream call to its first token, by provider and model",
    ["provider", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5),
)
LLM_FALLBACKS = Counter(
    "cxrelay_llm_fallbacks_total",
    "Times a route moved on to its next (provider, model), by the reason",
    ["route", "reason"],
)
LLM_RETRIES = Counter(
    "cxrelay_llm_retries_total", "Passes over a route repeated after a backoff", ["route"]
)
KEY_FAILURES = Counter(
    "cxrelay_provider_key_failures_total",
    "API keys marked unhealthy (401/403) or cooled (429), by provider and reason",
    ["provider", "reason"],
)
# Every worker holds the same keys and finds a revoked one on its own: the fewest any live worker
# still trusts is the truth (a sum would count each key once per worker).
KEYS_HEALTHY = Gauge(
    "cxrelay_provider_keys_healthy",
    "API keys currently usable (not revoked); with several workers, the fewest any one sees",
    ["provider"],
    multiprocess_mode="livemin",
)
# Every worker has its own breaker: the worst state any live worker is in.
CIRCUIT_STATE = Gauge(
    "cxrelay_provider_circuit_state",
    "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open (the worst worker's)",
    ["provider"],
    multiprocess_mode="livemax",
)

# --- safety, state and cache -------------------------------------------------------------------
SAFETY_EVENTS = Counter(
    "cxrelay_safety_events_total",
    "PII redactions and blocked replies, by surface and kind",
    ["surface", "kind"],
)
BOT_STATE_REJECTED = Counter(
    "cxrelay_bot_state_rejected_total",
    "botSessionState values not trusted (tampered, oversized, malformed): a new session began",
    ["reason"],
)
CACHE_LOOKUPS = Counter(
    "cxrelay_cache_lookups_total", "Intent cache lookups by result (hit, miss)", ["result"]
)
INJECTION_DETECTIONS = Counter(
    "cxrelay_prompt_injection_total",
    "User inputs matching a prompt-injection pattern, by pattern and mode",
    ["pattern", "mode"],
)

# prometheus-client's per-process files: counter_<pid>.db, gauge_livemax_<pid>.db, ...
_PROCESS_FILE = re.compile(r"^(?:counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db$")


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def exposition() -> tuple[bytes, str]:
    """The text exposition and its content type: this process's collectors, or, in multiprocess
    mode, every worker's added up (live gauges of workers that died are dropped first)."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    forget_dead_processes(path)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def wipe_process_files(path: Path) -> int:
    """Remove a previous run's per-process files (their counters would be added to this run's);
    only prometheus-client's own files, so a directory shared with anything else is safe."""
    removed = 0
    for entry in path.iterdir():
        if _PROCESS_FILE.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def forget_dead_processes(path: Path) -> None:
    """A worker that crashed never said so: its live gauges (keys healthy, circuit state) would
    count on. Counters and histograms stay: what the worker did still happened."""
    pids = {int(m.group(1)) for e in path.iterdir() if (m := _PROCESS_FILE.match(e.name))}
    for pid in pids:
        if not _alive(pid):
            mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def forget_this_process() -> None:
    """At a worker's exit: its live gauges leave the aggregate."""
    path = multiprocess_dir()
    if path is not None:
        with contextlib.suppress(OSError):
            mark_process_dead(os.getpid(), str(path))  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that pid: assume alive
    return True
