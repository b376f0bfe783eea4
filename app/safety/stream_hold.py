"""How much of a stream's held-back text could still become a PII value or an unsafe phrase.

A streamed answer must not be redacted delta by delta (a card number arrives in several deltas),
but holding whole sentences back costs the caller its time to first byte. The stdlib `re` cannot
tell whether a string is the beginning of a match; the `regex` package's partial matching can,
so the guard holds exactly the text from the first match that is still open at the end (a partial
match, or a complete one that could grow) and releases everything before it at once.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import regex

from app.safety.rules import SafetyRules, fold

_FLAGS = ("IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE", "ASCII", "UNICODE")


def _partial(pattern: re.Pattern[str]) -> regex.Pattern[str]:
    """The same pattern for the `regex` engine (its flag values differ from re's: map by name)."""
    flags = 0
    for name in _FLAGS:
        if pattern.flags & getattr(re, name):
            flags |= getattr(regex, name)
    return regex.compile(pattern.pattern, flags)


def _cut_before_matches(pattern: regex.Pattern[str], text: str, cut: int) -> int:
    """`cut`, moved back to the start of any match it would split or that is still open at the
    end of `text` (a partial match, or a complete one that could grow)."""
    for match in pattern.finditer(text, partial=True, overlapped=True):
        start, end = match.start(), match.end()
        if start < cut and (end > cut or end == len(text)):
            cut = start
    return int(cut)


class StreamHold:
    """The rules' patterns compiled for partial matching; build once per SafetyRules."""

    def __init__(self, rules: SafetyRules) -> None:
        self._pii = tuple(_partial(p.regex) for p in rules.pii_patterns)
        self._unsafe = {c.name: _partial(c.regex) for c in rules.unsafe_categories}

    def cut(self, text: str, limit: int, *, pii: bool, categories: Collection[str]) -> int:
        """The largest index <= `limit` where `text` may be split: no PII value or unsafe phrase
        lies across it or starts before it and is still open at the end."""
        patterns: list[regex.Pattern[str]] = list(self._pii) if pii else []
        checked = text
        if categories:
            checked = fold(text)  # what the unsafe patterns are matched against
            if len(checked) != len(text):
                return 0  # normalisation moved characters: indices do not map back, hold it all
        unsafe = [self._unsafe[name] for name in categories]
        cut = limit
        while True:  # moving the cut back can put it inside an earlier match: until it settles
            before = cut
            for pattern in patterns:
                cut = _cut_before_matches(pattern, text, cut)
            for pattern in unsafe:
                cut = _cut_before_matches(pattern, checked, cut)
            if cut == before:
                return cut
