"""Prompt-injection sanitising of customer input, driven by app/safety_rules/injection.yaml.

Customers type free text that ends up inside a prompt, so some of it will be written to steer
the model instead ("ignore all previous instructions", "reveal your system prompt", fake
"<|im_start|>system" turns). The first defence is the prompts themselves, which tell the model
that customer text is data to answer, never instructions to follow; this module is a heuristic
layer on top of that, not a replacement for it. Like the PII rules (`app.safety.rules`), the
patterns are data an operator can read and extend, compiled and validated once at start-up: a
broken entry stops start-up naming its file and entry.

Three modes, chosen by the operator:

- ``off``: nothing is checked.
- ``flag``: the text is passed on exactly as the customer wrote it and the pattern names are
  reported (the integrator turns them into a response header), with each counted in
  ``cxrelay_prompt_injection_total``. Operators see attempts without changing what any customer
  says, which matters while a pattern is new and might still catch an honest sentence.
- ``redact``: every match is replaced by ``[REMOVED]`` before the text reaches the model, so
  the instruction-like phrase never enters the prompt; detections are reported and counted
  the same way.
- ``filter``: ``redact`` with the budgets tutorial's (001) marker, ``[FILTERED]``, for a flow
  or a log reader that already looks for it.

The patterns are tuned so normal contact-centre language ("ignore my previous message",
"show me my invoice", "what are your instructions for returns") passes unchanged; the tests
keep a list of such sentences. Matching is on the original text (case-insensitive), so
redaction can cut exactly the matched span and leave the rest of the message as written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from app.observability import tracing
from app.observability.metrics import INJECTION_DETECTIONS
from app.safety.rules import (
    RULES_DIR,
    compile_rule,
    read_rules_yaml,
    rule_entries,
    rule_flags,
)

INJECTION_FILE = "injection.yaml"
REMOVED = "[REMOVED]"
FILTERED = "[FILTERED]"  # the budgets tutorial's (001) marker: PROMPT_INJECTION_MODE=filter

InjectionMode = Literal["off", "flag", "redact", "filter"]
MODES: tuple[str, ...] = get_args(InjectionMode)
REPLACEMENTS: dict[str, str] = {"redact": REMOVED, "filter": FILTERED}


def redacts(mode: InjectionMode) -> bool:
    """The mode cuts what it finds (redact, filter) instead of only reporting it."""
    return mode in REPLACEMENTS


@dataclass(frozen=True, slots=True)
class Sanitised:
    """What to pass on, and the names of the patterns found (file order, each once).

    In flag mode `text` is the input unchanged; in redact mode every match is "[REMOVED]" (in
    filter mode "[FILTERED]").
    """

    text: str
    matches: tuple[str, ...] = ()

    @property
    def detected(self) -> bool:
        return bool(self.matches)


@dataclass(frozen=True, slots=True)
class InjectionPattern:
    """One compiled entry of injection.yaml (always case-insensitive)."""

    name: str
    regex: re.Pattern[str]


class InjectionRules:
    """Compiled prompt-injection patterns; load once at start-up, share across surfaces."""

    def __init__(self, patterns: Iterable[InjectionPattern]) -> None:
        self.patterns: tuple[InjectionPattern, ...] = tuple(patterns)

    @classmethod
    def load(cls, directory: Path | str = RULES_DIR) -> InjectionRules:
        """Read injection.yaml from `directory` (the shipped rules by default).

        Blocking file I/O: call it at start-up (the lifespan), never per request.
        """
        path = Path(directory) / INJECTION_FILE
        return cls(_parse(read_rules_yaml(path), path))

    def sanitise(self, text: str, mode: InjectionMode) -> Sanitised:
        """Check `text` against every pattern in file order; see the module docstring for modes.

        Each pattern found is counted once per call in cxrelay_prompt_injection_total.
        An unknown mode raises ValueError (validate settings against MODES at start-up).
        """
        if mode == "off":
            return Sanitised(text)
        if mode != "flag" and mode not in REPLACEMENTS:
            raise ValueError(f"unknown prompt-injection mode {mode!r} (known: {MODES})")
        with tracing.span("safety.injection", {"cxrelay.safety.mode": mode}):
            checked = self._sanitise(text, mode)
            tracing.annotate({"cxrelay.safety.detections": len(checked.matches)})
            return checked

    def _sanitise(self, text: str, mode: InjectionMode) -> Sanitised:
        replacement = REPLACEMENTS.get(mode)
        found: list[str] = []
        for pattern in self.patterns:
            if replacement is not None:
                text, replaced = pattern.regex.subn(replacement, text)
                hit = replaced > 0
            else:
                hit = pattern.regex.search(text) is not None
            if hit:
                found.append(pattern.name)
                INJECTION_DETECTIONS.labels(pattern=pattern.name, mode=mode).inc()
        return Sanitised(text, tuple(found))


# --- loading ----------------------------------------------------------------------------------

_KEYS = frozenset({"name", "pattern", "flags"})


def _parse(raw: Any, path: Path) -> list[InjectionPattern]:
    patterns: list[InjectionPattern] = []
    for where, entry in rule_entries(raw, path, required=("name", "pattern"), allowed=_KEYS):
        flags = rule_flags(entry.get("flags"), where) | re.IGNORECASE
        patterns.append(
            InjectionPattern(entry["name"], compile_rule(entry["pattern"], flags, where))
        )
    return patterns
