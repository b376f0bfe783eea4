"""Chat messages as every layer below the surfaces sees them: OpenAI's shape, as plain dicts.

A message has a `role` (system, user, assistant, tool), a `content` that is a string, a list of
parts (`text`, `image_url`, `input_audio`) or None (an assistant turn that only calls tools),
and, on an assistant turn, `tool_calls` ([{id, type: "function", function: {name, arguments}}]),
on a tool turn its `tool_call_id`. OpenAI-compatible providers take them as they are; the
Anthropic wire translates them (app.llm.anthropic_provider). What reads a message's words — the
injection check, the token counts, the intent cache, the history fitting — goes through the
helpers here, so a list of parts or a tool call is never mistaken for a string.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterable, Mapping
from typing import Any

Message = dict[str, Any]
SYSTEM_ROLES = frozenset({"system", "developer"})  # OpenAI's newer name for the system turn

TEXT_PARTS_SEPARATOR = "\n"
MEDIA_PARTS = {"image_url": "vision", "input_audio": "audio"}  # part type -> model capability

# OpenAI's image token rule (vision guide): `low` detail costs 85 tokens; otherwise the image is
# scaled to fit 2048x2048, then its shortest side to 768, and costs 85 + 170 per 512-px tile.
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
# An image whose size cannot be read (a URL): the most the rule can charge (768 x 2048: 8 tiles).
IMAGE_MAX_TOKENS = IMAGE_BASE_TOKENS + 8 * IMAGE_TILE_TOKENS
# Audio: OpenAI counts ~10 tokens a second; an unread length is charged as a minute.
AUDIO_TOKENS_PER_SECOND = 10
AUDIO_UNKNOWN_TOKENS = 600


def message_text(message: Mapping[str, Any]) -> str:
    """The words of a message's content: the string, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return TEXT_PARTS_SEPARATOR.join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def with_text(message: Message, text: str) -> Message:
    """`message` with its words replaced by `text` (a content of parts keeps its media parts)."""
    content = message.get("content")
    if not isinstance(content, list):
        return {**message, "content": text}
    media = [p for p in content if not (isinstance(p, Mapping) and p.get("type") == "text")]
    return {**message, "content": [{"type": "text", "text": text}, *media]}


def tool_calls_of(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    calls = message.get("tool_calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def media_parts(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every image and audio part, in order."""
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            found += [p for p in content if isinstance(p, dict) and p.get("type") in MEDIA_PARTS]
    return found


def capabilities_needed(messages: Iterable[Mapping[str, Any]]) -> set[str]:
    """The model capabilities (`vision`, `audio`) a conversation's parts need."""
    return {MEDIA_PARTS[str(part["type"])] for part in media_parts(messages)}


def cache_text(message: Mapping[str, Any]) -> str:
    """Everything of a message that shapes the answer, as one string for the intent cache key:
    its words, the calls an assistant turn made, the call a tool turn answers, and each media
    part (its URL or data, which an image's tokens follow from)."""
    parts = [message_text(message)]
    for call in tool_calls_of(message):
        function = call.get("function") or {}
        parts.append(f"[call {function.get('name')}({function.get('arguments')})]")
    if message.get("tool_call_id"):
        parts.append(f"[result of {message['tool_call_id']}]")
    for part in media_parts([message]):
        parts.append(json.dumps(part, sort_keys=True))
    return "\n".join(p for p in parts if p)


def call_texts(message: Mapping[str, Any]) -> list[str]:
    """The strings of an assistant turn's tool calls that reach the model: names, arguments."""
    texts = []
    for call in tool_calls_of(message):
        function = call.get("function") or {}
        texts += [str(function.get("name") or ""), str(function.get("arguments") or "")]
    return texts


def media_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """The prompt tokens of the image and audio parts, by OpenAI's rules (conservative when a
    size cannot be read: a budget must not be overrun by what was not counted)."""
    total = 0
    for part in media_parts(messages):
        if part.get("type") == "image_url":
            total += image_tokens(part.get("image_url"))
        else:
            total += audio_tokens(part.get("input_audio"))
    return total


def image_tokens(image: Any) -> int:
    spec = image if isinstance(image, Mapping) else {"url": image}
    if spec.get("detail") == "low":
        return IMAGE_BASE_TOKENS
    size = _data_url_image_size(str(spec.get("url") or ""))
    if size is None:
        return IMAGE_MAX_TOKENS
    scale = min(1.0, 2048 / max(size))
    width, height = size[0] * scale, size[1] * scale
    if min(width, height) > 768:
        shrink = 768 / min(width, height)
        width, height = width * shrink, height * shrink
    tiles = math.ceil(width / 512) * math.ceil(height / 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def audio_tokens(audio: Any) -> int:
    data = audio.get("data") if isinstance(audio, Mapping) else None
    fmt = audio.get("format") if isinstance(audio, Mapping) else None
    if isinstance(data, str) and fmt == "wav":
        seconds = _wav_seconds(data)
        if seconds is not None:
            return max(1, math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))
    return AUDIO_UNKNOWN_TOKENS


def _decoded_head(data: str, size: int = 64) -> bytes | None:
    try:
        return base64.b64decode(data[: 4 * ((size + 2) // 3)] + "==", validate=False)
    except (binascii.Error, ValueError):
        return None


def _data_url_image_size(url: str) -> tuple[int, int] | None:
    """(width, height) of a `data:` URL's PNG, GIF or JPEG (its header), else None."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    data = url.split(";base64,", 1)[1]
    head = _decoded_head(data, 32)
    if head is None:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return int(width), int(height)
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return int(width), int(height)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _jpeg_size(data: str) -> tuple[int, int] | None:
    """A JPEG's size from its first start-of-frame marker (read from at most 64 KiB)."""
    try:
        raw = base64.b64decode(data[: 4 * (65536 // 3)] + "==", validate=False)
    except (binascii.Error, ValueError):
        return None
    i = 2
    while i + 9 < len(raw):
        if raw[i] != 0xFF:
            return None
        marker, length = raw[i + 1], struct.unpack(">H", raw[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", raw[i + 5 : i + 9])
            return int(width), int(height)
        i += 2 + length
    return None


def _wav_seconds(data: str) -> float | None:
    head = _decoded_head(data, 44)
    if head is None or len(head) < 44 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    byte_rate = int(struct.unpack("<I", head[28:32])[0])
    if byte_rate <= 0:
        return None
    size = len(data) * 3 // 4 - 44
    return max(0.0, size / byte_rate)
