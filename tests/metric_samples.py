"""Reading the process-global Prometheus collectors in tests: a test takes a snapshot before it
acts and asserts on the exact changes after (other tests have counted before it)."""

from __future__ import annotations

from prometheus_client import REGISTRY

Labels = tuple[tuple[str, str], ...]
Changes = dict[str, dict[Labels, float]]

WATCHED = (
    "cxrelay_requests_total",
    "cxrelay_turns_total",
    "cxrelay_tokens_total",
    "cxrelay_cost_usd_total",
    "cxrelay_budget_exhausted_total",
    "cxrelay_cache_lookups_total",
    "cxrelay_request_latency_seconds_count",
    "cxrelay_upstream_latency_seconds_count",
    "cxrelay_llm_retries_total",
    "cxrelay_time_to_first_token_seconds_count",
)


def samples(name: str) -> dict[Labels, float]:
    """Every sample called `name` (e.g. "cxrelay_requests_total"), by its sorted labels."""
    found: dict[Labels, float] = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def labels(**values: str) -> Labels:
    return tuple(sorted(values.items()))


def snapshot() -> Changes:
    return {name: samples(name) for name in WATCHED}


def changes(before: Changes) -> Changes:
    """What changed since `before`, per watched sample; unchanged label sets are left out."""
    result: Changes = {}
    for name in WATCHED:
        after = samples(name)
        moved = {k: round(v - before[name].get(k, 0.0), 9) for k, v in after.items()}
        result[name] = {k: v for k, v in moved.items() if v}
    return result


def label_values() -> set[str]:
    """Every label value of every cxrelay_* sample."""
    return {
        value
        for metric in REGISTRY.collect()
        if metric.name.startswith("cxrelay_")
        for sample in metric.samples
        for value in sample.labels.values()
    }
