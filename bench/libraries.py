"""Hand-written code against the kept library that could replace it, on the same inputs, in one run
(issue 21, item 9; the decisions are in docs/libraries.md).

    .venv/bin/python bench/libraries.py [--baseline REF] [--repeat N]

The hand-written side is the module as it stood at REF (by default the commit before the
replacements; `git show REF:path`, loaded as a module of its own), so no copy of the old code is
kept in the tree. Each row is the best of N runs (the least disturbed by the other processes on
a shared machine) of one operation repeated; the ratio is library / hand-written (above 1: the
library is slower).

  * SSE: an OpenAI-style stream (300 chunk events, a keep-alive comment every 50) read from an
    async byte iterator in 1,400-byte reads and in 9-byte reads, and one 1 MB event (a long
    tool-call argument) in 4 KB reads: REF's hand-written `iter_sse` against today's (httpx-sse
    over an httpx.Response with the same body).
  * Intent cache: 10,000 gets (90 % hits) and 2,000 puts on a 1,000-entry cache, with the keys
    computed as the service computes them: REF's OrderedDict against today's TTLCache.
  * Validators: the card, IBAN and SSN checks on valid and invalid inputs (REF's against
    today's, python-stdnum), and a whole reply through the PII rules (REF's rules and validators
    against today's, which also look for Spanish and French national IDs).
  * Ledger backoff: the delay of attempt n, the hand-written formula against tenacity's
    wait_exponential (it is not on the hot path: it runs only while the store is down).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import tenacity  # noqa: E402

# the last commit of main before the replacements
BASELINE = "d7bbc23"


def baseline_module(ref: str, path: str, name: str) -> ModuleType:
    """`path` as it stood at `ref`, imported as module `name` (its imports: today's app)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, f"{ref}:{path}", "exec"), module.__dict__)
    return module


def best_of(repeat: int, run: Callable[[], Any]) -> float:
    """The fastest of `repeat` runs, in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def row(name: str, unit: str, count: int, old: float, new: float) -> dict[str, Any]:
    return {
        "case": name,
        "hand_written_us": round(old / count * 1e6, 3),
        "library_us": round(new / count * 1e6, 3),
        "per": unit,
        "ratio": round(new / old, 3),
    }


# --- SSE ------------------------------------------------------------------------------------


def openai_stream(events: int = 300) -> bytes:
    lines = []
    for i in range(events):
        if i % 50 == 0:
            lines.append(": keep-alive\n\n")
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}],
        }
        lines.append(f"data: {json.dumps(chunk)}\n\n")
    lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


def pieces(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


async def _aiter(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def hand_written_sse(streaming: ModuleType, parts: list[bytes]) -> int:
    return len([event.data async for event in streaming.iter_sse(_aiter(parts))])


async def httpx_sse_events(parts: list[bytes]) -> int:
    """Today's `streaming.iter_sse` (httpx-sse, plus its end-of-body rule)."""
    from app.llm.streaming import iter_sse

    response = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=_aiter(parts)
    )
    return len([event.data async for event in iter_sse(response)])


def bench_sse(ref: str, repeat: int) -> list[dict[str, Any]]:
    streaming = baseline_module(ref, "app/llm/streaming.py", "baseline_streaming")
    body = openai_stream()
    huge = b"data: " + b'{"arguments": "' + b"x" * 1_000_000 + b'"}\n\n'
    cases = [
        ("SSE, 300 events, 1,400-byte reads", pieces(body, 1400), 301),
        ("SSE, 300 events, 9-byte reads", pieces(body, 9), 301),
        ("SSE, one 1 MB event, 4 KB reads", pieces(huge, 4096), 1),
    ]
    rows = []
    for name, parts, events in cases:
        assert asyncio.run(hand_written_sse(streaming, parts)) == events
        assert asyncio.run(httpx_sse_events(parts)) == events
        old = best_of(repeat, lambda p=parts: asyncio.run(hand_written_sse(streaming, p)))
        new = best_of(repeat, lambda p=parts: asyncio.run(httpx_sse_events(p)))
        rows.append(row(name, "stream", 1, old, new))
    return rows


# --- intent cache ---------------------------------------------------------------------------


def bench_cache(ref: str, repeat: int) -> list[dict[str, Any]]:
    from app.cache import intent_cache as current

    old_module = baseline_module(ref, "app/cache/intent_cache.py", "baseline_intent_cache")
    answer = current.CachedAnswer("Your order ships today.", "openai", "gpt-4o-mini", 12, 6)
    questions = [f"Where is my order number {i}?" for i in range(1_100)]
    system = "You are a helpful contact-center assistant. " * 20

    def workload(cache: Any) -> None:
        for question in questions[:1_000]:
            cache.put("tenant-a", "gpt-4o-mini", system, question, answer)
        for i in range(10_000):
            # 9 of 10 questions were asked before; the rest miss
            index = i % 1_000 if i % 10 else 1_000 + i % 100
            cache.get("tenant-a", "gpt-4o-mini", system, questions[index])
        for question in questions[:1_000]:
            cache.put("tenant-b", "gpt-4o-mini", system, question, answer)

    old = best_of(repeat, lambda: workload(old_module.IntentCache(max_entries=1_000)))
    new = best_of(repeat, lambda: workload(current.IntentCache(max_entries=1_000)))
    return [row("intent cache: 10,000 gets + 2,000 puts", "operation", 12_000, old, new)]


# --- validators -----------------------------------------------------------------------------


def bench_validators(ref: str, repeat: int) -> list[dict[str, Any]]:
    import dataclasses
    import tempfile

    from app.safety import validators as current
    from app.safety.rules import PII_FILE, RULES_DIR, UNSAFE_FILE, SafetyRules

    old = baseline_module(ref, "app/safety/validators.py", "baseline_validators")
    cards = ["4111 1111 1111 1111", "4111111111111112", "3782 822463 10005", "5555555555554444"]
    ibans = ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "DE89370400440532013001"]
    ssns = ["123-45-6789", "666-12-3456", "899 99 9999"]
    cases: list[tuple[str, Callable[[str], bool], Callable[[str], bool], list[str]]] = [
        ("card check (Luhn)", old.luhn, current.luhn, cards),
        ("IBAN check (mod 97)", old.iban, current.iban, ibans),
        ("US SSN check", old.ssn, current.ssn, ssns),
    ]
    rows = []
    rounds = 2_000
    for name, hand, library, values in cases:
        assert [hand(v) for v in values] == [library(v) for v in values], name

        def run(check: Callable[[str], bool], values: list[str] = values) -> None:
            for _ in range(rounds):
                for value in values:
                    check(value)

        old_time = best_of(repeat, lambda h=hand: run(h))
        new_time = best_of(repeat, lambda lib=library: run(lib))
        rows.append(row(name, "check", rounds * len(values), old_time, new_time))

    # A whole reply through the PII rules: the rules and validators of `ref` against today's
    # (which also look for Spanish and French national IDs).
    with tempfile.TemporaryDirectory() as directory:
        for name in (PII_FILE, UNSAFE_FILE):
            source = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{ref}:app/safety_rules/{name}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (Path(directory) / name).write_text(source)
        loaded = SafetyRules.load(directory)
    hand_written = {"iban": old.iban, "card": old.luhn, "ssn": old.ssn, "phone": old.phone}
    hand_rules = SafetyRules(
        [
            dataclasses.replace(p, validator=hand_written[p.name]) if p.validator else p
            for p in loaded.pii_patterns
        ],
        loaded.unsafe_categories,
    )
    library_rules = SafetyRules.load(RULES_DIR)
    reply = (
        "Thanks for waiting. Your order 12345678 (ticket 1234567890123) ships on 2024-03-12. "
        "We refunded the card 4111 1111 1111 1111 to IBAN DE89 3704 0044 0532 0130 00; call "
        "us on +1 415 555 0123 or write to help@example.com if anything looks wrong. "
    ) * 3
    assert hand_rules.redact(reply) == library_rules.redact(reply)
    count = 2_000
    old_time = best_of(repeat, lambda: [hand_rules.redact(reply) for _ in range(count)])
    new_time = best_of(repeat, lambda: [library_rules.redact(reply) for _ in range(count)])
    rows.append(row("PII redaction of a 729-character reply", "reply", count, old_time, new_time))
    return rows


# --- ledger backoff -------------------------------------------------------------------------


def bench_backoff(repeat: int) -> list[dict[str, Any]]:
    initial, ceiling = 0.2, 30.0
    wait = tenacity.wait_exponential(multiplier=initial, max=ceiling)
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})

    def hand(failures: int) -> float:
        return min(ceiling, initial * 2 ** min(failures - 1, 16))

    def library(failures: int) -> float:
        state.attempt_number = failures
        return float(wait(state))

    assert all(abs(hand(n) - library(n)) < 1e-9 for n in range(1, 40))
    count = 20_000
    old = best_of(repeat, lambda: [hand(n % 30 + 1) for n in range(count)])
    new = best_of(repeat, lambda: [library(n % 30 + 1) for n in range(count)])
    return [row("ledger backoff delay", "delay", count, old, new)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git ref of the hand-written code")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = [
        *bench_sse(args.baseline, args.repeat),
        *bench_cache(args.baseline, args.repeat),
        *bench_validators(args.baseline, args.repeat),
        *bench_backoff(args.repeat),
    ]
    print("| case | hand-written (µs) | library (µs) | per | library / hand-written |")
    print("|---|---:|---:|---|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['hand_written_us']} | {r['library_us']} | {r['per']} "
            f"| {r['ratio']}x |"
        )


if __name__ == "__main__":
    main()
