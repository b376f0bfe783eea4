"""The intent cache: exact match on normalised input per tenant, model and system instruction,
TTL expiry, LRU eviction at a size bound, and hit/miss metrics."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from app.cache.intent_cache import CachedAnswer, IntentCache, normalise_input

SYSTEM = "You are the Acme support assistant."
MODEL = "gpt-4o-mini"
# "Where is my order?" in full-width forms (U+FF01..U+FF5E), built so no look-alike sits in source.
FULL_WIDTH = "".join(" " if c == " " else chr(ord(c) + 0xFEE0) for c in "Where is my order?")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(content: str = "Your order ships tomorrow.") -> CachedAnswer:
    return CachedAnswer(
        content=content, provider="openai", model=MODEL, prompt_tokens=42, completion_tokens=7
    )


def lookups(result: str) -> float:
    value = REGISTRY.get_sample_value("cxrelay_cache_lookups_total", {"result": result})
    return value or 0.0


def test_hit_after_put_returns_the_stored_answer() -> None:
    cache = IntentCache()
    stored = answer()
    assert cache.get("acme", MODEL, SYSTEM, "Where is my order?") is None
    cache.put("acme", MODEL, SYSTEM, "Where is my order?", stored)
    assert cache.get("acme", MODEL, SYSTEM, "Where is my order?") == stored
    assert len(cache) == 1


def test_case_and_whitespace_are_normalised() -> None:
    cache = IntentCache()
    cache.put("acme", MODEL, SYSTEM, "  Where IS my   order?", answer())
    assert cache.get("acme", MODEL, SYSTEM, "where is my order?") == answer()
    assert cache.get("acme", MODEL, SYSTEM, "where\tis\nmy order?\u00a0") == answer()
    assert len(cache) == 1


def test_nfkc_full_width_letters_match_ascii() -> None:
    cache = IntentCache()
    cache.put("acme", MODEL, SYSTEM, FULL_WIDTH, answer())
    assert FULL_WIDTH != "Where is my order?"
    assert normalise_input(FULL_WIDTH) == "where is my order?"
    assert cache.get("acme", MODEL, SYSTEM, "Where is my order?") == answer()


@pytest.mark.parametrize(
    ("tenant", "model", "system"),
    [
        ("acme", "claude-3-5-haiku", SYSTEM),
        ("acme", MODEL, SYSTEM + " Be brief."),
        ("globex", MODEL, SYSTEM),
    ],
    ids=["other-model", "other-system-instruction", "other-tenant"],
)
def test_a_different_model_system_instruction_or_tenant_misses(
    tenant: str, model: str, system: str
) -> None:
    cache = IntentCache()
    cache.put("acme", MODEL, SYSTEM, "Where is my order?", answer())
    assert cache.get(tenant, model, system, "Where is my order?") is None


def test_tenants_never_share_entries() -> None:
    cache = IntentCache()
    cache.put("acme", MODEL, SYSTEM, "Where is my order?", answer("Acme answer"))
    cache.put("globex", MODEL, SYSTEM, "Where is my order?", answer("Globex answer"))
    assert len(cache) == 2
    hit_a = cache.get("acme", MODEL, SYSTEM, "Where is my order?")
    hit_b = cache.get("globex", MODEL, SYSTEM, "Where is my order?")
    assert hit_a is not None and hit_a.content == "Acme answer"
    assert hit_b is not None and hit_b.content == "Globex answer"


def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    cache = IntentCache(ttl_seconds=60.0, clock=clock)
    cache.put("acme", MODEL, SYSTEM, "Where is my order?", answer())
    clock.now += 59.9
    assert cache.get("acme", MODEL, SYSTEM, "Where is my order?") == answer()
    clock.now += 0.1
    misses = lookups("miss")
    assert cache.get("acme", MODEL, SYSTEM, "Where is my order?") is None
    assert lookups("miss") == misses + 1
    assert len(cache) == 0


def test_default_ttl_is_one_hour() -> None:
    clock = FakeClock()
    cache = IntentCache(clock=clock)
    cache.put("acme", MODEL, SYSTEM, "q", answer())
    clock.now += 3599
    assert cache.get("acme", MODEL, SYSTEM, "q") is not None
    clock.now += 1
    assert cache.get("acme", MODEL, SYSTEM, "q") is None


def test_a_put_again_refreshes_the_ttl() -> None:
    clock = FakeClock()
    cache = IntentCache(ttl_seconds=60.0, clock=clock)
    cache.put("acme", MODEL, SYSTEM, "q", answer("old"))
    clock.now += 50
    cache.put("acme", MODEL, SYSTEM, "q", answer("new"))
    clock.now += 50
    hit = cache.get("acme", MODEL, SYSTEM, "q")
    assert hit is not None and hit.content == "new"
    assert len(cache) == 1


def test_lru_eviction_keeps_an_entry_touched_by_get() -> None:
    cache = IntentCache(max_entries=3)
    for question in ("q1", "q2", "q3"):
        cache.put("acme", MODEL, SYSTEM, question, answer(question))
    assert cache.get("acme", MODEL, SYSTEM, "q1") is not None  # q1 is now the most recent
    cache.put("acme", MODEL, SYSTEM, "q4", answer("q4"))  # evicts q2, the least recent
    assert cache.get("acme", MODEL, SYSTEM, "q2") is None
    for question in ("q1", "q3", "q4"):
        assert cache.get("acme", MODEL, SYSTEM, question) is not None
    cache.put("acme", MODEL, SYSTEM, "q5", answer("q5"))  # q1 is now the least recent
    assert cache.get("acme", MODEL, SYSTEM, "q1") is None
    assert len(cache) == 3


def test_the_size_bound_holds() -> None:
    cache = IntentCache(max_entries=5)
    for i in range(50):
        cache.put(f"tenant-{i % 3}", MODEL, SYSTEM, f"question {i}", answer(f"a{i}"))
        assert len(cache) <= 5
    assert len(cache) == 5
    for i in range(45, 50):
        assert cache.get(f"tenant-{i % 3}", MODEL, SYSTEM, f"question {i}") is not None


def test_empty_content_is_not_stored() -> None:
    cache = IntentCache()
    cache.put("acme", MODEL, SYSTEM, "q", answer(""))
    cache.put("acme", MODEL, SYSTEM, "q2", answer("   \n"))
    assert len(cache) == 0
    assert cache.get("acme", MODEL, SYSTEM, "q") is None


def test_clear_empties_the_cache() -> None:
    cache = IntentCache()
    cache.put("acme", MODEL, SYSTEM, "q", answer())
    cache.clear()
    assert len(cache) == 0
    assert cache.get("acme", MODEL, SYSTEM, "q") is None


def test_invalid_configuration_is_rejected() -> None:
    with pytest.raises(ValueError):
        IntentCache(max_entries=0)
    with pytest.raises(ValueError):
        IntentCache(ttl_seconds=0)


def test_the_metric_counts_hits_and_misses() -> None:
    hits, misses = lookups("hit"), lookups("miss")
    cache = IntentCache()
    cache.get("acme", MODEL, SYSTEM, "q")
    cache.put("acme", MODEL, SYSTEM, "q", answer())
    cache.get("acme", MODEL, SYSTEM, "q")
    cache.get("acme", MODEL, SYSTEM, "Q ")
    cache.get("globex", MODEL, SYSTEM, "q")
    assert lookups("hit") == hits + 2
    assert lookups("miss") == misses + 2


def test_keys_do_not_contain_the_raw_input_or_system_instruction() -> None:
    cache = IntentCache()
    question = "My card number is 4111 1111 1111 1111, where is my order?"
    cache.put("acme", MODEL, SYSTEM, question, answer())
    keys = list(cache._entries)
    assert len(keys) == 1
    key = keys[0]
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    for secret in (question, normalise_input(question), "4111", "order", SYSTEM, "acme"):
        assert secret not in key
