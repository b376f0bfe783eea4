"""Prometheus collectors. Names are stable (documented in the README); labels are bounded:
provider, model, route, outcome and reason come from configuration or fixed vocabularies,
never from a session id, a key or a customer's text."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
TURNS = Counter(
    "cxrelay_turns_total",
    "Webhook and chat turns by surface and outcome (answered, fallback, handoff, rejected ...)",
    ["surface", "outcome"],
)
TOKENS = Counter(
    "cxrelay_tokens_total",
    "Tokens by surface, provider, model and kind (prompt, completion)",
    ["surface", "provider", "model", "kind"],
)
COST = Counter(
    "cxrelay_cost_usd_total",
    "Money spent at the provider file's prices, by surface, provider and model",
    ["surface", "provider", "model"],
)
TURN_LATENCY = Histogram(
    "cxrelay_request_latency_seconds",
    "Time to answer a turn, by surface",
    ["surface"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13),
)
TTFT = Histogram(
    "cxrelay_time_to_first_token_seconds",
    "Time from the request to the first streamed token, by provider and model",
    ["provider", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5),
)
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
