"""PII redaction and unsafe-output checks, driven by data files under app/safety_rules/.

Every surface (CXone bot replies, Cognigy, /chat) filters through the same rules, so the rules
are data an operator can read and replace (a list of named patterns with validators), not ifs
scattered over routers. Everything is compiled and validated once, when the rules are loaded at
start-up: a broken rule stops start-up naming its file and entry, and the per-reply work is a
handful of precompiled regex passes.

A regex alone over-redacts digits (order numbers, tickets), so a pattern may name a validator
(Luhn for cards, mod-97 for IBANs, the SSA rules for SSNs; see `safety_validators`): a match
that fails it, and every shorter match ending at a word boundary inside it, stays as it is.
The compiled patterns are exposed so a streaming filter can reuse them later.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from app.core.errors import ConfigError
from app.safety.validators import VALIDATORS, Validator

RULES_DIR = Path(__file__).resolve().parent.parent / "safety_rules"
PII_FILE = "pii.yaml"
UNSAFE_FILE = "unsafe.yaml"

_NO_FLAGS = re.RegexFlag(0)  # re.NOFLAG arrived only in Python 3.11
_FLAGS: Mapping[str, re.RegexFlag] = MappingProxyType(
    {
        "IGNORECASE": re.IGNORECASE,
        "MULTILINE": re.MULTILINE,
        "DOTALL": re.DOTALL,
        "VERBOSE": re.VERBOSE,
        "ASCII": re.ASCII,
    }
)


# --- rules ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redaction:
    """The redacted text and how many matches each pattern replaced (names with none left out)."""

    text: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.counts)


@dataclass(frozen=True, slots=True)
class PiiPattern:
    """One compiled entry of pii.yaml; the regex is public so a streaming filter can reuse it."""

    name: str
    label: str
    regex: re.Pattern[str]
    validator: Validator | None = None

    def apply(self, text: str) -> tuple[str, int]:
        """Replace every validated match; the count excludes matches the validator refused."""
        match = self.regex.search(text)
        if match is None:
            return text, 0
        if self.validator is None:
            return self.regex.subn(lambda _match: self.label, text)
        pieces: list[str] = []
        kept_from = replaced = 0
        while match is not None:
            accepted = self._accept(text, match, self.validator)
            if accepted is not None:
                pieces += (text[kept_from : accepted.start()], self.label)
                kept_from = resume = accepted.end()
                replaced += 1
            else:
                resume = max(match.end(), match.start() + 1)
            match = self.regex.search(text, resume) if resume <= len(text) else None
        pieces.append(text[kept_from:])
        return "".join(pieces), replaced

    def _accept(
        self, text: str, match: re.Match[str], validator: Validator
    ) -> re.Match[str] | None:
        """The match, or failing that the longest shorter one ending at a word boundary.

        A greedy pattern can swallow what follows the real value (a CVV after a card, "EUR"
        after an IBAN) and then fail its check; trying again up to each earlier word boundary
        finds the value without ever cutting through a word or a digit run. Rare, so cheap.
        """
        start = match.start()
        if match.end() == start:
            return None
        if validator(match.group()):
            return match
        for end in range(match.end() - 1, start, -1):
            if _is_word(text[end - 1]) and not _is_word(text[end]):
                shorter = self.regex.match(text, start, end)
                if shorter is not None and shorter.end() > start and validator(shorter.group()):
                    return shorter
        return None


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


@dataclass(frozen=True, slots=True)
class UnsafeCategory:
    """One category's entries compiled into a single alternation, to search in fold(text)."""

    name: str
    regex: re.Pattern[str]


def fold(text: str) -> str:
    """The form unsafe-output patterns are matched against: NFKC, then lower case.

    NFKC keeps full-width and ligature look-alikes from slipping past; lower-casing once is
    cheaper than an IGNORECASE search per category. Only used for checks, never for output.
    """
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return text.lower()


class SafetyRules:
    """Compiled PII patterns and unsafe-output categories; load once, share everywhere."""

    def __init__(
        self, pii_patterns: Iterable[PiiPattern], unsafe_categories: Iterable[UnsafeCategory]
    ) -> None:
        self.pii_patterns: tuple[PiiPattern, ...] = tuple(pii_patterns)
        self.unsafe_categories: tuple[UnsafeCategory, ...] = tuple(unsafe_categories)
        self.category_names: frozenset[str] = frozenset(c.name for c in self.unsafe_categories)

    @classmethod
    def load(cls, directory: Path | str = RULES_DIR) -> SafetyRules:
        """Read pii.yaml and unsafe.yaml from `directory` (the shipped rules by default).

        Blocking file I/O: call it at start-up (the lifespan), never per request.
        """
        directory = Path(directory)
        pii_path, unsafe_path = directory / PII_FILE, directory / UNSAFE_FILE
        return cls(
            _parse_pii(read_rules_yaml(pii_path), pii_path),
            _parse_unsafe(read_rules_yaml(unsafe_path), unsafe_path),
        )

    def redact(self, text: str) -> Redaction:
        """Apply the PII patterns in file order; each sees what the previous ones left."""
        counts: dict[str, int] = {}
        for pattern in self.pii_patterns:
            text, replaced = pattern.apply(text)
            if replaced:
                counts[pattern.name] = replaced
        return Redaction(text, counts)

    def contains_pii(self, text: str) -> bool:
        """Whether any PII pattern finds a (validated) value in `text`: for an identifier, where
        one match makes the whole value personal data (app.safety.session_ids)."""
        return any(pattern.apply(text)[1] for pattern in self.pii_patterns)

    def unsafe_category(self, text: str, categories: Collection[str] | None = None) -> str | None:
        """The first category (in file order) the text matches, or None; all when not given.

        An unknown category name raises ConfigError rather than silently checking less:
        validate configured subsets with check_categories() at start-up.
        """
        if categories is not None:
            self.check_categories(categories)
        text = fold(text)
        for category in self.unsafe_categories:
            if categories is not None and category.name not in categories:
                continue
            if category.regex.search(text):
                return category.name
        return None

    def check_categories(self, categories: Collection[str]) -> None:
        """Refuse names that are not categories, so a typo in settings stops start-up."""
        unknown = sorted(set(categories) - self.category_names)
        if unknown:
            known = ", ".join(c.name for c in self.unsafe_categories)
            raise ConfigError(f"unknown unsafe-output categories {unknown} (known: {known})")


# --- loading ----------------------------------------------------------------------------------

_PII_KEYS = frozenset({"name", "label", "pattern", "validator", "flags"})


def read_rules_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"safety rules {path}: cannot be read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"safety rules {path}: not valid YAML: {exc}") from None


def rule_entries(
    raw: Any, path: Path, *, required: tuple[str, ...], allowed: frozenset[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each entry of a rules file that is a list of named patterns, with where it stands (for
    error messages), after the checks every such file shares: a mapping, known fields only,
    required fields non-empty strings, names unique."""
    if not isinstance(raw, list):
        raise ConfigError(f"safety rules {path}: must be a list of patterns")
    fields = f"{', '.join(required[:-1])} and {required[-1]}"
    seen: set[str] = set()
    for index, entry in enumerate(raw, start=1):
        where = f"safety rules {path}, entry {index}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping with {fields}")
        if isinstance(entry.get("name"), str) and entry["name"]:
            where += f" ({entry['name']!r})"
        unknown = sorted(set(map(str, entry)) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown fields {unknown}")
        for key in required:
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ConfigError(f"{where}: missing or empty {key!r}")
        if entry["name"] in seen:
            raise ConfigError(f"{where}: duplicate name {entry['name']!r}")
        seen.add(entry["name"])
        yield where, entry


def _parse_pii(raw: Any, path: Path) -> list[PiiPattern]:
    patterns: list[PiiPattern] = []
    for where, entry in rule_entries(
        raw, path, required=("name", "label", "pattern"), allowed=_PII_KEYS
    ):
        name: str = entry["name"]
        validator: Validator | None = None
        if entry.get("validator") is not None:
            validator = VALIDATORS.get(entry["validator"])
            if validator is None:
                known = ", ".join(sorted(VALIDATORS))
                raise ConfigError(
                    f"{where}: unknown validator {entry['validator']!r} (known: {known})"
                )
        flags = rule_flags(entry.get("flags"), where)
        regex = compile_rule(entry["pattern"], flags, where)
        patterns.append(PiiPattern(name, entry["label"], regex, validator))
    return patterns


def _parse_unsafe(raw: Any, path: Path) -> list[UnsafeCategory]:
    if not isinstance(raw, dict):
        raise ConfigError(f"safety rules {path}: must map category names to lists of entries")
    categories: list[UnsafeCategory] = []
    for name, entries in raw.items():
        where = f"safety rules {path}, category {name!r}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: the name must be a non-empty string")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}: must be a non-empty list of phrases or {{regex: ...}}")
        source = _category_source(
            [
                _unsafe_entry(entry, f"{where}, entry {index}")
                for index, entry in enumerate(entries, 1)
            ]
        )
        categories.append(UnsafeCategory(name, compile_rule(source, _NO_FLAGS, where)))
    return categories


@dataclass(frozen=True, slots=True)
class _Phrase:
    body: str  # lower-cased, escaped regex source
    starts_word: bool
    ends_word: bool


_CURLY_APOSTROPHE = "\u2019"


def _unsafe_entry(entry: Any, where: str) -> _Phrase | str:
    """A phrase, or a regex entry as source; each is compiled alone so an error names its entry.

    Phrases are written in lower case because the text is lower-cased before matching (cheaper
    than IGNORECASE); regex entries keep their own source and get a local (?i:...) instead.
    """
    if isinstance(entry, str) and entry.strip():
        words = entry.lower().replace(_CURLY_APOSTROPHE, "'").split()
        body = r"\s+".join(re.escape(word) for word in words)
        phrase = _Phrase(
            body.replace("'", f"['{_CURLY_APOSTROPHE}]"),
            starts_word=_is_word(words[0][0]),
            ends_word=_is_word(words[-1][-1]),
        )
        compile_rule(phrase.body, _NO_FLAGS, where)
        return phrase
    if isinstance(entry, dict) and set(entry) == {"regex"} and isinstance(entry["regex"], str):
        source = f"(?i:{entry['regex']})"
        compile_rule(source, _NO_FLAGS, where)
        return source
    raise ConfigError(f"{where}: must be a phrase or {{regex: ...}}, got {entry!r}")


def _category_source(entries: list[_Phrase | str]) -> str:
    """One alternation per category, phrases grouped by their boundaries.

    A phrase matches whole words only ("kill yourself" not inside "skill yourself"), but a
    phrase that starts or ends with punctuation ("api key:") gets no boundary on that side.
    Hoisting the shared lookarounds out of the alternation lets the engine reject positions
    inside a word at once: several times faster than one lookaround per phrase.
    """
    groups: dict[tuple[bool, bool], list[str]] = {}
    regexes: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            regexes.append(entry)
        else:
            groups.setdefault((entry.starts_word, entry.ends_word), []).append(entry.body)
    parts = [
        ("(?<!\\w)" if starts else "") + f"(?:{'|'.join(bodies)})" + ("(?!\\w)" if ends else "")
        for (starts, ends), bodies in groups.items()
    ]
    return "|".join(parts + regexes)


def rule_flags(raw: Any, where: str) -> re.RegexFlag:
    if raw is None:
        return _NO_FLAGS
    if not isinstance(raw, list) or not all(isinstance(flag, str) for flag in raw):
        raise ConfigError(f"{where}: flags must be a list of names")
    combined = _NO_FLAGS
    for flag in raw:
        if flag.upper() not in _FLAGS:
            known = ", ".join(_FLAGS)
            raise ConfigError(f"{where}: unknown flag {flag!r} (known: {known})")
        combined |= _FLAGS[flag.upper()]
    return combined


def compile_rule(source: str, flags: re.RegexFlag, where: str) -> re.Pattern[str]:
    try:
        regex = re.compile(source, flags)
    except re.error as exc:
        raise ConfigError(f"{where}: invalid regex: {exc}") from None
    if regex.match("") is not None:
        raise ConfigError(f"{where}: the regex matches the empty string")
    return regex
