"""The output side of the safety rules for the chat surfaces: PII redaction and unsafe-output
blocking, on a whole answer or on a stream as it passes through, and on the arguments of the
tool calls a model makes (each string in them, so they stay JSON).

A stream cannot be redacted delta by delta: a card number arrives in several deltas. The guard
releases each delta's text at once up to the last space, except from where a PII pattern or an
unsafe phrase may be under way (`stream_hold`: partial matching), so a match is never split
across what the caller receives while ordinary text is not held back; the word still being
written waits for its end. Held text that runs past `max_hold_chars` is released at its last
space between words. Once any released text (with everything before it) matches an unsafe
category, nothing more is released and `blocked` names the category: the caller ends the stream
with a content-filter stop instead.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from app.observability import tracing
from app.observability.metrics import SAFETY_EVENTS
from app.safety.rules import SafetyRules
from app.safety.stream_hold import StreamHold

_SPACE = re.compile(r"\s+")
_WORD_SPACE = re.compile(r"(?<=[^\W\d])\s+")  # a space after a letter: never inside a number
_DIGIT = re.compile(r"\d")


@dataclass(frozen=True)
class Checked:
    """A whole answer after the guard: the text to give, and what was blocked or redacted."""

    text: str
    blocked: str | None
    redactions: dict[str, int]


@dataclass
class OutputGuard:
    """One answer's guard. `redact` applies the PII patterns; `categories` are the unsafe
    categories to block (empty: none)."""

    rules: SafetyRules
    surface: str
    redact: bool = True
    categories: Collection[str] = ()
    max_hold_chars: int = 400
    blocked: str | None = None
    redactions: dict[str, int] = field(default_factory=dict)
    _held: str = ""
    _released: str = ""

    def check(self, text: str) -> Checked:
        """A whole answer: redacted, or blocked (the caller substitutes its fallback text)."""
        with tracing.span("safety.output_guard"):
            released = self._release(text)
            self._trace()
            return Checked(released if self.blocked is None else "", self.blocked, self.redactions)

    def feed(self, delta: str) -> str:
        """Text that may be passed on now (often ""), or "" for ever once blocked."""
        if self.blocked is not None:
            return ""
        self._held += delta
        cut = self._cut(self._held, _last_space_end(self._held))
        if cut == 0 and len(self._held) > self.max_hold_chars:
            cut = _last_word_space(self._held)
        if cut == 0:
            return ""
        ready, self._held = self._held[:cut], self._held[cut:]
        return self._release(ready)

    def finish(self) -> str:
        """The stream ended: release what is still held."""
        ready, self._held = self._held, ""
        with tracing.span("safety.output_guard", {"cxrelay.safety.streamed": True}):
            released = "" if self.blocked is not None or not ready else self._release(ready)
            self._trace()
            return released

    def _trace(self) -> None:
        """What the guard did to the whole answer: redactions counted, a block's category."""
        if not tracing.enabled():
            return
        tracing.annotate({"cxrelay.safety.redactions": sum(self.redactions.values())})
        if self.blocked is not None:
            tracing.annotate({"cxrelay.safety.blocked": self.blocked})

    def check_tool_calls(self, calls: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        """Tool calls by the same rules as text: each string in a call's JSON arguments is
        redacted (the arguments stay valid JSON), and an unsafe one blocks the whole answer (the
        caller gets no calls then). Arguments that are not JSON are checked as one string."""
        checked = []
        for call in calls:
            function = call.get("function") or {}
            arguments = str(function.get("arguments") or "")
            try:
                parsed = json.loads(arguments)
            except ValueError:
                safe = self._argument(arguments)
            else:
                safe = json.dumps(self._walk(parsed), ensure_ascii=False)
            if self.blocked is not None:
                return ()
            checked.append({**call, "function": {**function, "arguments": safe}})
        return tuple(checked)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._argument(value)
        if isinstance(value, list):
            return [self._walk(item) for item in value]
        if isinstance(value, dict):
            return {key: self._walk(item) for key, item in value.items()}
        return value

    def _argument(self, text: str) -> str:
        """One argument string: redacted, checked on its own (not joined to the answer's text)."""
        if self.blocked is not None:
            return ""
        text = self._redacted(text)
        if self.categories:
            category = self.rules.unsafe_category(text, self.categories)
            if category is not None:
                self.blocked = category
                SAFETY_EVENTS.labels(self.surface, f"unsafe_{category}").inc()
        return text

    @property
    def released(self) -> str:
        """Everything passed on so far."""
        return self._released

    def _cut(self, text: str, limit: int) -> int:
        if limit == 0 or (not self.redact and not self.categories):
            return limit
        hold = _stream_hold(self.rules)
        return hold.cut(text, limit, pii=self.redact, categories=self.categories)

    def _redacted(self, text: str) -> str:
        if not self.redact:
            return text
        redaction = self.rules.redact(text)
        for name, n in redaction.counts.items():
            self.redactions[name] = self.redactions.get(name, 0) + n
            SAFETY_EVENTS.labels(self.surface, f"redacted_{name}").inc(n)
        return redaction.text

    def _release(self, text: str) -> str:
        text = self._redacted(text)
        if self.categories:
            category = self.rules.unsafe_category(self._released + text, self.categories)
            if category is not None:
                self.blocked = category
                SAFETY_EVENTS.labels(self.surface, f"unsafe_{category}").inc()
                return ""
        self._released += text
        return text


@functools.lru_cache(maxsize=8)
def _stream_hold(rules: SafetyRules) -> StreamHold:
    """Compiled once per rule set (the service loads one), not per answer."""
    return StreamHold(rules)


def _last_space_end(text: str) -> int:
    """The end of the last run of whitespace: what follows is a word still being written."""
    end = 0
    for match in _SPACE.finditer(text):
        end = match.end()
    return end


def _last_word_space(text: str) -> int:
    """The end of the last space after a word that cannot be part of a value being redacted:
    neither that word nor the one before it holds a digit. A space after letters alone is not
    enough: an IBAN's bank code ("GB82 WEST 1234 ...") is a group of letters after digits, and
    cutting there would release half the IBAN unredacted."""
    for match in reversed(list(_WORD_SPACE.finditer(text))):
        if not _DIGIT.search(" ".join(text[: match.start()].rsplit(None, 2)[-2:])):
            return match.end()
    return 0
