"""Token estimates for when a provider's `usage` is missing (marked as estimated wherever shown).

Counts follow the chat format's shape: every message costs a few tokens of framing on top of its
text, and the reply is primed with a few more. The text itself is estimated at ~4 characters a
token, the usual figure for English with OpenAI's BPE encodings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

TOKENS_PER_MESSAGE = 3
REPLY_PRIMING_TOKENS = 3
CHARS_PER_TOKEN = 4


def text_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_tokens(messages: Iterable[Mapping[str, str]]) -> int:
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE + text_tokens(message.get("content", ""))
    return total
