"""OpenAI's chat request as Anthropic's Messages API takes it, and Anthropic's answer back.

Both ways, so the pipeline and the callers only ever see OpenAI's shape:

- messages: system (and developer) turns become the top-level `system`; the others must
  alternate user/assistant and start with a user turn (consecutive same-role turns are merged,
  a leading user turn is added); an assistant turn's `tool_calls` become `tool_use` blocks and
  a `tool` turn a `tool_result` block in a user turn; image parts become `image` blocks (a
  `data:` URL as base64, another URL by reference);
- tools: `{type: function, function: {name, description, parameters}}` becomes `{name,
  description, input_schema}`; `tool_choice` auto / required / none / a named function becomes
  auto / any / none / tool, and `parallel_tool_calls: false` its `disable_parallel_tool_use`;
- options: `stop` becomes `stop_sequences`, `top_p` stays; the router never sends this wire
  an option it cannot honour (ANTHROPIC_OPTIONS);
- the answer: `tool_use` blocks become `tool_calls` (their `input` as the JSON arguments) and
  the stop reason OpenAI's finish reason (max_tokens is `length`, tool_use is `tool_calls`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from app.llm.messages import SYSTEM_ROLES, Message, message_text, tool_calls_of

# Anthropic rejects a conversation that starts with an assistant turn (or has no turn at all).
LEADING_USER_TURN = "(start of conversation)"
# The OpenAI request options this wire can honour (app.llm.types.CHAT_OPTIONS).
ANTHROPIC_OPTIONS = frozenset({"stop", "top_p"})
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: object) -> str | None:
    """Anthropic's stop reason as OpenAI's finish reason (an unknown one passes as it is)."""
    if not stop_reason:
        return None
    return FINISH_REASONS.get(str(stop_reason), str(stop_reason))


def split_messages(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """OpenAI-style turns to Anthropic's `(system, messages)`; a turn of text only keeps a
    string content, a turn with tool calls, results or images a list of blocks."""
    system_parts: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = str(message.get("role", "user"))
        if role in SYSTEM_ROLES:
            text = message_text(message)
            if text.strip():
                system_parts.append(text)
            continue
        blocks = _blocks(message)
        if not blocks:
            continue
        role = "assistant" if role == "assistant" else "user"  # a tool result is the user's
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if not turns or turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": [_text(LEADING_USER_TURN)]})
    last = turns[-1]
    if last["role"] == "assistant" and last["content"][-1]["type"] == "text":
        # A final assistant turn is a prefill, and Anthropic refuses one ending in whitespace.
        last["content"][-1] = _text(last["content"][-1]["text"].rstrip())
    return ("\n\n".join(system_parts) or None), [_collapsed(turn) for turn in turns]


def _blocks(message: Message) -> list[dict[str, Any]]:
    if message.get("role") == "tool":
        return [
            {
                "type": "tool_result",
                "tool_use_id": str(message.get("tool_call_id") or ""),
                "content": message_text(message) or "(no output)",
            }
        ]
    blocks: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "text" and str(part.get("text") or "").strip():
                blocks.append(_text(str(part["text"])))
            elif part.get("type") == "image_url":
                blocks.append(_image(part.get("image_url")))
    elif isinstance(content, str) and content.strip():
        blocks.append(_text(content))
    for call in tool_calls_of(message):
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or ""),
                "name": str(function.get("name") or ""),
                "input": _arguments(function.get("arguments")),
            }
        )
    return blocks


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image(image: Any) -> dict[str, Any]:
    url = str((image.get("url") if isinstance(image, Mapping) else image) or "")
    if url.startswith("data:") and ";base64," in url:
        media_type, data = url.removeprefix("data:").split(";base64,", 1)
        source = {"type": "base64", "media_type": media_type, "data": data}
    else:
        source = {"type": "url", "url": url}
    return {"type": "image", "source": source}


def _arguments(raw: Any) -> dict[str, Any]:
    """A call's JSON arguments as Anthropic's `input` object (an argument string that is not a
    JSON object is kept whole, under one key, rather than lost)."""
    try:
        parsed = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
    except ValueError:
        return {"arguments": raw}
    return parsed if isinstance(parsed, dict) else {"arguments": parsed}


def _collapsed(turn: dict[str, Any]) -> dict[str, Any]:
    """A turn of text blocks only as one string, as Anthropic's simplest form."""
    blocks = turn["content"]
    if all(b["type"] == "text" for b in blocks):
        return {"role": turn["role"], "content": "\n\n".join(b["text"] for b in blocks)}
    return turn


def tools_payload(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
) -> dict[str, Any]:
    """The `tools` and `tool_choice` fields of a Messages API request."""
    if not tools:
        return {}
    body: dict[str, Any] = {
        "tools": [
            {
                "name": function.get("name"),
                **({"description": function["description"]} if function.get("description") else {}),
                "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
            }
            for function in (tool.get("function") or {} for tool in tools)
        ]
    }
    choice: dict[str, Any] | None = None
    if tool_choice == "auto":
        choice = {"type": "auto"}
    elif tool_choice == "required":
        choice = {"type": "any"}
    elif tool_choice == "none":
        choice = {"type": "none"}
    elif isinstance(tool_choice, Mapping):
        choice = {"type": "tool", "name": (tool_choice.get("function") or {}).get("name")}
    if parallel_tool_calls is False:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        body["tool_choice"] = choice
    return body


def options_payload(options: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    stop = options.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if options.get("top_p") is not None:
        body["top_p"] = options["top_p"]
    return body


def answer_tool_calls(blocks: list[Any]) -> tuple[dict[str, Any], ...]:
    """An answer's `tool_use` blocks as OpenAI's `tool_calls` (TypeError when malformed)."""
    calls = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            continue
        name, arguments = block["name"], block.get("input") or {}
        if not isinstance(name, str):
            raise TypeError("a tool_use block's name is a string")
        calls.append(
            {
                "id": str(block.get("id") or ""),
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
        )
    return tuple(calls)
