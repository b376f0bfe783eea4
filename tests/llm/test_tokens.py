"""Token counts: exact against tiktoken, the chat format's framing, offline, loaded once.

The reference values below were computed with tiktoken 0.14.0 itself (OpenAI's tokenizer, with
OpenAI's encoding files checked against tiktoken's pinned SHA-256) and are hard-coded here. The
service counts with tiktoken's core; bpe-openai's own tokenizer (a separate Rust implementation)
is the independent reference the corpus tests compare with.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.llm import tokens
from app.llm.messages import IMAGE_BASE_TOKENS, IMAGE_MAX_TOKENS
from app.llm.tokens import (
    CL100K_BASE,
    DEFAULT_ENCODING,
    FALLBACK_ENCODING,
    O200K_BASE,
    Encoder,
    TokenCounters,
    encoding_for_model,
    estimate_tokens,
    load_counter,
    openai_encoding,
    text_tokens,
)

ROOT = Path(__file__).resolve().parents[2]

# text -> (cl100k_base tokens, o200k_base tokens), from tiktoken's encode_ordinary
REFERENCE_COUNTS = {
    "hello world": (2, 2),
    "tiktoken is great!": (6, 6),
    "naïve café \u2013 Straße": (7, 6),
    "Привет, мир!": (7, 5),
    "日本語のテキスト": (8, 6),
    "🚀": (3, 2),
    "👩\u200d👩\u200d👧\u200d👦": (18, 11),  # a ZWJ family emoji
    "   \n\n": (1, 1),
    "<|endoftext|>": (7, 7),  # user text: special-token lookalikes are ordinary text
    "": (0, 0),
}

# OpenAI cookbook, "How to count tokens with tiktoken": the API reports 129 prompt tokens for
# these messages on gpt-3.5-turbo-0613 / gpt-4-0613 / gpt-4, and 124 on gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# The SHA-256 tiktoken pins for OpenAI's encoding files (tiktoken_ext/openai_public.py).
TIKTOKEN_SHA256 = {
    CL100K_BASE: "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    O200K_BASE: "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}


@pytest.mark.parametrize("text", list(REFERENCE_COUNTS))
def test_text_counts_equal_tiktoken(text: str) -> None:
    cl100k, o200k = REFERENCE_COUNTS[text]
    assert load_counter("gpt-4").count_text(text) == cl100k
    assert load_counter("gpt-4o").count_text(text) == o200k


def test_token_ids_equal_tiktoken() -> None:
    cl100k = tokens._load_tiktoken(CL100K_BASE)
    o200k = tokens._load_tiktoken(O200K_BASE)
    assert cl100k.encode_ordinary("hello world") == [15339, 1917]
    assert o200k.encode_ordinary("hello world") == [24912, 2375]
    assert cl100k.encode_ordinary("naïve café \u2013 Straße") == [
        3458,
        38672,
        588,
        53050,
        1389,
        27745,
        24352,
    ]
    assert o200k.encode_ordinary("日本語のテキスト") == [9048, 40909, 3385, 16056, 18368, 38236]
    assert cl100k.encode_ordinary("🚀") == [9468, 248, 222]
    assert o200k.encode_ordinary("🚀") == [112927, 222]


CORPUS = [
    "I'M SURE they'll say it's fine, we've DONE it; you'd agree?",
    "  leading spaces,\ttabs\t\tand   runs   of spaces   \n\n\n  and blank lines\r\n",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 0x1F 1e-9",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "Ünïcödé: Ελληνικά, русский, עברית, العربية, हिन्दी, 中文, 日本語, 한국어",
    "emoji 🚀🔥👍🏽 👨‍👩‍👧 and symbols ©®™ €£¥ ≠≤≥ ∑∫√",
    "URL https://example.com/path?q=1&r=two#frag and e-mail a.b@c.de",
    "MixedCASE camelCase snake_case kebab-case SCREAMING_CASE",
    "<|endoftext|> is only text here, as are <|fim_prefix|> and <|endofprompt|>",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE at the start",
]


@pytest.mark.parametrize("encoding", [CL100K_BASE, O200K_BASE])
def test_ids_equal_an_independent_tokenizer_on_a_corpus(encoding: str) -> None:
    """The split patterns and ranks, checked against bpe-openai's own Rust tokenizer, which
    shares no code with tiktoken's."""
    import bpe_openai  # type: ignore[import-untyped]

    reference = bpe_openai.get_encoding(encoding)
    ours = tokens._load_tiktoken(encoding)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for text in [*CORPUS, readme]:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text), text[:60]


def test_a_rank_file_that_is_not_openais_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = gzip.decompress(tokens.ranks_file(O200K_BASE).read_bytes())
    first, rest = original.split(b"\n", 1)
    token, _rank = first.split()
    swapped = tmp_path / "o200k_base.tiktoken.gz"
    swapped.write_bytes(gzip.compress(token + b" 7\n" + rest))
    monkeypatch.setattr(tokens, "ranks_file", lambda encoding: swapped)
    with pytest.raises(RuntimeError, match="SHA-256"):
        tokens._load_tiktoken(O200K_BASE)
    counters = TokenCounters()
    counter = counters.for_model("gpt-4o")
    assert counter.estimated and counter.encoding == FALLBACK_ENCODING


@pytest.mark.slow
def test_exact_counting_does_not_import_bpe_openai() -> None:
    """Its rank files are read as data; importing the package would cost ~66 MiB."""
    script = (
        "import sys; from app.llm import tokens; tokens.preload(['gpt-4o']);"
        "assert not tokens.load_counter('gpt-4o').estimated;"
        "print('bpe_openai' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("encoding", [CL100K_BASE, O200K_BASE])
def test_bundled_encoding_files_are_openais(encoding: str) -> None:
    """The package ships OpenAI's files byte for byte: the hashes tiktoken itself checks."""
    data = tokens.ranks_file(encoding)
    assert (
        hashlib.sha256(gzip.decompress(data.read_bytes())).hexdigest()
        == (TIKTOKEN_SHA256[encoding])
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo-0613", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_chat_overhead_matches_the_cookbook(model: str, expected: int) -> None:
    counter = load_counter(model)
    assert counter.count_messages(COOKBOOK_MESSAGES) == expected
    assert not counter.estimated


def test_chat_overhead_rule() -> None:
    counter = load_counter("gpt-4o")
    # 3 to prime the reply; 3 a message; role and content text ("user", "hello": 1 each)
    assert counter.count_messages([]) == 3
    assert counter.count_messages([{"role": "user", "content": "hello"}]) == 3 + 3 + 1 + 1
    # a name costs its text and 1 more
    named = [{"role": "user", "name": "bob", "content": "hello"}]
    assert counter.count_messages(named) == 3 + 3 + 1 + 1 + counter.count_text("bob") + 1
    # content given as parts: the text parts count as text; an image by OpenAI's rule (85 at
    # low detail; of a size that cannot be read, the most an image can cost)
    low = {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}}
    unread = {"type": "image_url", "image_url": {"url": "data:,"}}
    for image, cost in ((low, IMAGE_BASE_TOKENS), (unread, IMAGE_MAX_TOKENS)):
        parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, image]}]
        assert counter.count_messages(parts) == 3 + 3 + 1 + 2 + cost


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", O200K_BASE),
        ("gpt-4o-mini", O200K_BASE),
        ("gpt-4o-2024-08-06", O200K_BASE),
        ("chatgpt-4o-latest", O200K_BASE),
        ("gpt-4.1", O200K_BASE),
        ("gpt-4.1-nano", O200K_BASE),
        ("gpt-4.5-preview", O200K_BASE),
        ("gpt-5", O200K_BASE),
        ("gpt-5.1-mini", O200K_BASE),
        ("o1", O200K_BASE),
        ("o1-mini", O200K_BASE),
        ("o3-pro", O200K_BASE),
        ("o4-mini", O200K_BASE),
        ("GPT-4O", O200K_BASE),
        ("openai/gpt-4o-mini", O200K_BASE),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", O200K_BASE),
        ("gpt-4", CL100K_BASE),
        ("gpt-4-0613", CL100K_BASE),
        ("gpt-4-turbo", CL100K_BASE),
        ("gpt-4-32k", CL100K_BASE),
        ("gpt-3.5-turbo", CL100K_BASE),
        ("gpt-3.5-turbo-0125", CL100K_BASE),
        ("gpt-35-turbo", CL100K_BASE),
        ("text-embedding-3-small", CL100K_BASE),
        ("text-embedding-ada-002", CL100K_BASE),
        ("ft:gpt-3.5-turbo:acme::xyz", CL100K_BASE),
    ],
)
def test_openai_models_map_to_their_encoding(model: str, encoding: str) -> None:
    assert openai_encoding(model) == encoding
    assert encoding_for_model(model) == encoding
    counter = load_counter(model)
    assert counter.encoding == encoding
    assert not counter.estimated


@pytest.mark.parametrize(
    "model",
    [
        None,
        "",
        "claude-3-5-sonnet-latest",
        "llama-3.1-70b",
        "gemini-2.0-flash",
        "mistral-large",
        "o1x",
        "gpt-4.2",
        "my-azure-deployment",
    ],
)
def test_other_models_use_the_default_encoding_marked_estimated(model: str | None) -> None:
    assert openai_encoding(model) is None
    counter = load_counter(model)
    assert counter.encoding == DEFAULT_ENCODING == O200K_BASE
    assert counter.estimated
    assert counter.count_text("hello world") == 2


def test_module_functions_keep_working() -> None:
    assert text_tokens("hello world") == 2
    assert estimate_tokens([{"role": "user", "content": "hello"}]) == 8
    assert estimate_tokens(COOKBOOK_MESSAGES, model="gpt-4") == 129
    assert text_tokens("🚀", model="gpt-4") == 3


def test_long_texts_are_counted_exactly_in_pieces() -> None:
    """Long texts are counted in pieces cut where no pretoken spans the cut: the sum equals one
    count of the whole (bpe-openai, the reference, takes up to 1,000,000 characters a call)."""
    import bpe_openai  # type: ignore[import-untyped]

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    while len(text) < 300_000:
        text += "\n" + text
    text = text[:999_000]
    for model in ("gpt-4", "gpt-4o"):
        counter = load_counter(model)
        direct = len(bpe_openai.get_encoding(counter.encoding).encode_ordinary(text))
        assert counter.count_text(text) == direct


@pytest.mark.slow
def test_pathological_texts_do_not_raise() -> None:
    counter = load_counter("gpt-4o")
    assert counter.count_text("word\n" * 240_000) == 480_000  # 1.2 M characters
    assert counter.count_text("🚀" * 300_000) == 600_000  # 1.2 MB in one pretoken run
    assert counter.count_text("a" * 1_200_000) > 0  # no safe cut: a close count
    assert counter.count_text("\ud800 lone surrogate") > 0


@pytest.mark.slow
def test_counts_are_offline_from_the_install_alone(tmp_path: Path) -> None:
    """A fresh process with no cache, an unroutable proxy and every socket call refused."""
    cache = tmp_path / "cache"
    cache.mkdir()
    script = """
import json, socket
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from app.llm import tokens
tokens.preload(["gpt-4", "gpt-4o"])
counters = {m: tokens.load_counter(m) for m in ("gpt-4", "gpt-4o")}
print(json.dumps({
    "counts": {m: c.count_text("hello world 🚀") for m, c in counters.items()},
    "estimated": {m: c.estimated for m, c in counters.items()},
    "loaded": tokens._counters.loaded(),
}))
"""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    }
    env.update(
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        ALL_PROXY="http://127.0.0.1:9",
        TIKTOKEN_CACHE_DIR=str(cache),
        DATA_GYM_CACHE_DIR=str(cache),
        XDG_CACHE_HOME=str(cache),
        HOME=str(tmp_path),
        PYTHONPATH=str(ROOT),
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["counts"] == {"gpt-4": 2 + 3, "gpt-4o": 2 + 2}  # " 🚀": 3 and 2 tokens
    assert out["estimated"] == {"gpt-4": False, "gpt-4o": False}
    assert out["loaded"] == {CL100K_BASE: True, O200K_BASE: True}
    assert "UNAVAILABLE" not in result.stderr
    assert list(cache.iterdir()) == []


class _CountingLoader:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.delay = delay

    def __call__(self, encoding: str) -> Encoder:
        self.calls.append(encoding)
        time.sleep(self.delay)
        return tokens._load_tiktoken(encoding)


def test_each_encoding_loads_once() -> None:
    loader = _CountingLoader(delay=0.2)
    counters = TokenCounters(loader)
    threads = [
        threading.Thread(target=counters.for_model, args=(model,))
        for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "claude-3-haiku", None) * 4
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.calls == [O200K_BASE]
    counters.preload(["gpt-4", "gpt-3.5-turbo", "gpt-4o"])
    for _ in range(100):
        counters.for_model("gpt-4").count_text("hello world")
        counters.for_model("o3").count_messages(COOKBOOK_MESSAGES)
    assert sorted(loader.calls) == [CL100K_BASE, O200K_BASE]
    assert counters.loaded() == {CL100K_BASE: True, O200K_BASE: True}


def test_a_tokenizer_that_cannot_load_falls_back_loudly(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def broken(encoding: str) -> Encoder:
        calls.append(encoding)
        raise ImportError("No module named 'bpe_openai'")

    counters = TokenCounters(broken)
    with caplog.at_level(logging.ERROR, logger="cxrelay.tokens"):
        counter = counters.for_model("gpt-4o")
        again = counters.for_model("gpt-4o-mini")
    assert calls == [O200K_BASE]  # a failure is not retried on every request either
    assert counter.estimated and again.estimated
    assert counter.encoding == FALLBACK_ENCODING
    assert counter.count_text("hello world") == 3  # 11 characters, ~4 a token
    assert counter.count_messages([{"role": "user", "content": "hello world"}]) == 3 + 3 + 1 + 3
    assert counters.loaded() == {O200K_BASE: False}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "TOKENIZER UNAVAILABLE" in errors[0].getMessage()


def test_estimate_mode_counts_characters_without_a_tokenizer_or_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        with caplog.at_level(logging.INFO, logger="cxrelay.tokens"):
            tokens.use_exact_counting(False)
            counter = tokens.load_counter("gpt-4o")
        assert counter.estimated
        assert counter.encoding == FALLBACK_ENCODING
        assert counter.count_text("hello world") == 3
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        tokens.use_exact_counting(True)
    exact = tokens.load_counter("gpt-4o")
    assert not exact.estimated and exact.count_text("hello world") == 2


def test_a_tokenizer_with_wrong_ids_is_not_trusted(caplog: pytest.LogCaptureFixture) -> None:
    class Wrong:
        def encode_ordinary(self, text: str) -> list[int]:
            return [1] * len(text.split())

    counters = TokenCounters(lambda encoding: Wrong())
    with caplog.at_level(logging.ERROR, logger="cxrelay.tokens"):
        counter = counters.for_model("gpt-4")
    assert counter.estimated
    assert counter.encoding == FALLBACK_ENCODING
    assert any("TOKENIZER UNAVAILABLE" in r.getMessage() for r in caplog.records)


def test_an_encoding_start_up_left_out_is_ready_once_loaded() -> None:
    """The embedding models' encodings are not loaded at start-up (tokens.ready loads one on
    the first call that needs it): `ready` tells whether a load is still to come."""
    loads: list[str] = []

    def loader(encoding: str) -> Encoder:
        loads.append(encoding)
        raise RuntimeError("no tables in this test")  # counted by characters then

    counters = TokenCounters(loader=loader)
    assert not counters.ready(["text-embedding-3-small"])
    counters.preload(["text-embedding-3-small"])
    assert counters.ready(["text-embedding-3-small"])
    assert "cl100k_base" in loads
    counters.preload(["text-embedding-3-small"])
    assert loads.count("cl100k_base") == 1  # once, however often it is asked for


class _RecordingEncoder:
    """Records what each encode call is given."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.pieces: list[str] = []

    def encode_ordinary(self, text: str) -> list[int]:
        self.pieces.append(text)
        return self.inner.encode_ordinary(text)


def _longest_run(text: str) -> int:
    return max((len(m.group()) for m in re.finditer(r"\S+|\s+", text)), default=0)


@pytest.mark.parametrize(
    "text",
    [
        "🚀" * 60_000,  # a 240 KB body of one emoji: 9 s of BPE in one piece
        " " * 100_000,
        "é" * 120_000,
        "prefix words " + "a" * 10_000 + " and words after\n" + "x" * 700,
    ],
)
def test_a_long_run_reaches_the_tokenizer_in_bounded_pieces(text: str) -> None:
    """tiktoken's BPE is quadratic in one pretoken's length: no encode call is ever given a
    run longer than the bound, and the count stays within a token per piece of the exact one."""
    recording = _RecordingEncoder(tokens._load_tiktoken(O200K_BASE))
    counter = tokens.TokenCounter("gpt-4o", O200K_BASE, recording)
    counted = counter.count_text(text)
    assert max(_longest_run(piece) for piece in recording.pieces) <= tokens._MAX_RUN_CHARS
    exact = len(tokens._load_tiktoken(O200K_BASE).encode_ordinary(text[:20_000]))
    if len(text) <= 20_000:
        assert abs(counted - exact) <= len(recording.pieces)


def test_ordinary_text_is_counted_in_one_piece_exactly() -> None:
    recording = _RecordingEncoder(tokens._load_tiktoken(O200K_BASE))
    text = (ROOT / "README.md").read_text(encoding="utf-8")[:40_000]
    counted = tokens.TokenCounter("gpt-4o", O200K_BASE, recording).count_text(text)
    assert recording.pieces == [text]
    assert counted == len(tokens._load_tiktoken(O200K_BASE).encode_ordinary(text))
