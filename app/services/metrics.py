"""Prometheus collectors. Names are stable (documented in the README); labels are bounded:
provider, model, route, outcome and reason come from configuration or fixed vocabularies,
never from a session id, a key or a customer's text."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

LLM_ATTEMPTS = Counter(
    "cxrelay_llm_attempts_total",
    "Upstream LLM attempts by provider, model and outcome",
    ["provider", "model", "outcome"],
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
KEYS_HEALTHY = Gauge(
    "cxrelay_provider_keys_healthy", "API keys currently usable (not revoked)", ["provider"]
)
CIRCUIT_STATE = Gauge(
    "cxrelay_provider_circuit_state",
    "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open",
    ["provider"],
)
