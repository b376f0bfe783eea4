"""The intent cache of the chat surfaces: a repeated question costs nothing and answers instantly.

A lookup is an exact match on the normalised user input (Unicode NFKC, casefolded, every run of
whitespace collapsed to one space, stripped) together with the tenant, the model and the system
instruction, so "  Where IS my   order?" and "where is my order?" share an entry but a different
model, a changed system instruction or another tenant never does: tenants never share entries.
A hit is served without going upstream, so it costs no tokens and the caller marks the reply
`cached: true`.

Only validated, safe answers are cached: callers `put` an answer only after output validation and
the safety checks have passed on it, never a fallback, a refusal, a blocked or a redacted-away
reply. `put` itself refuses an empty answer. The cache serves exactly what was stored.

Entries live `ttl_seconds` (one hour by default); an expired entry is a miss. The cache holds at
most `max_entries`; writing to a full cache evicts the least recently used entry (a hit counts as
a use). Both are cachetools' TTLCache: LRU order with a per-entry expiry, on the cache's clock.
Keys are the SHA-256 of a canonical tuple (tenant, model, SHA-256 of the system instruction,
normalised input), so a key does not keep a customer's text around longer than its entry does.
Every lookup increments `cxrelay_cache_lookups_total{result="hit"|"miss"}`; there is no tenant
label (bounded cardinality).

The cache is in-process (per replica) and thread-safe (TTLCache is not: a lock guards it).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from app.observability.metrics import CACHE_LOOKUPS

__all__ = ["CachedAnswer", "IntentCache", "cache_key", "normalise_input"]

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CachedAnswer:
    """A validated, safe answer as it is served on a hit."""

    content: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    model_used: str = ""  # the configured model that answered ("" where no surface shows it)


def normalise_input(text: str) -> str:
    """NFKC, casefold, collapse whitespace runs to one space, strip."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE.sub(" ", folded).strip()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(tenant: str, model: str, system_instruction: str, user_input: str) -> str:
    """The storage key: SHA-256 of the canonical (tenant, model, sha(system), normalised input)."""
    canonical = json.dumps(
        [tenant, model, _sha256(system_instruction), normalise_input(user_input)],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return _sha256(canonical)


class IntentCache:
    """Exact-match answer cache per tenant, with a TTL and LRU eviction at a size bound."""

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._entries: TTLCache[str, CachedAnswer] = TTLCache(
            maxsize=max_entries, ttl=ttl_seconds, timer=clock
        )
        self._lock = threading.Lock()

    def get(
        self, tenant: str, model: str, system_instruction: str, user_input: str
    ) -> CachedAnswer | None:
        """The cached answer, or None on a miss (absent or expired). Counts the lookup."""
        key = cache_key(tenant, model, system_instruction, user_input)
        with self._lock:
            answer = self._entries.get(key)  # a hit moves the entry to the LRU's young end
        CACHE_LOOKUPS.labels(result="miss" if answer is None else "hit").inc()
        return answer

    def put(
        self,
        tenant: str,
        model: str,
        system_instruction: str,
        user_input: str,
        answer: CachedAnswer,
    ) -> None:
        """Store a validated, safe answer; an empty (or blank) answer is not stored."""
        if not answer.content.strip():
            return
        key = cache_key(tenant, model, system_instruction, user_input)
        with self._lock:
            self._entries[key] = answer  # a full cache evicts its least recently used entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
