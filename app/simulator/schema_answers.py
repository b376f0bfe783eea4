"""The simulated LLM's answer to a request that carries a JSON Schema: an object built from the
schema, so a structured call succeeds on its first attempt in simulated mode, as it does with a
real model that is shown the schema.

The schema comes as OpenAI's `response_format: {"type": "json_schema", ...}`, or written into the
system text after the words "JSON Schema" (how a provider without that response format is told,
Anthropic's included). Values are taken from the routing decision the simulator would give for
the customer's words where a property has its name (`classified_intent`, `confidence` ...) and
fits; otherwise made from the schema: an enum member (the one the intent names, when there is
one), a conversational string, a bounded number, one array item. Schemas past what this knows
(a `pattern`, deep `allOf`) may get an answer that breaks them, as a model's sometimes does, and
the relay then repairs it.

OpenAI's strict mode is checked too: `strict: true` with a schema outside its subset (an object
without `additionalProperties: false`, or a property not in `required`) is refused with 400, as
OpenAI refuses it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import validators

from app.simulator.answers import routing_decision

_MAX_DEPTH = 12
# Where a schema written into the instruction starts: the first object after these words.
_SCHEMA_IN_TEXT = re.compile(r"JSON Schema\b")
_REPLY_NAMES = re.compile(r"reply|response|answer|message|text|summary", re.I)
_HUMAN_NAMES = re.compile(r"human|agent|escalat|handoff|transfer", re.I)
_EXAMPLE_FORMATS: dict[str, str] = {
    "date": "2025-01-31",
    "date-time": "2025-01-31T12:00:00Z",
    "time": "12:00:00Z",
    "email": "customer@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def schema_in_text(text: str) -> dict[str, Any] | None:
    """The JSON object that follows the last mention of "JSON Schema" in `text`, if any."""
    decoder = json.JSONDecoder()
    for mention in reversed(list(_SCHEMA_IN_TEXT.finditer(text))):
        start = text.find("{", mention.end())
        if start < 0:
            continue
        try:
            found, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    return None


def strict_mode_problem(schema: dict[str, Any]) -> str | None:
    """Why OpenAI's strict mode would refuse `schema` (None: it would take it)."""

    def walk(node: Any, where: str, depth: int) -> str | None:
        if depth > _MAX_DEPTH or not isinstance(node, dict):
            return None
        properties = node.get("properties")
        if node.get("type") == "object" or isinstance(properties, dict):
            if node.get("additionalProperties") is not False:
                return (
                    f"In context={where}, 'additionalProperties' is required to be supplied "
                    "and to be false"
                )
            names = set(properties) if isinstance(properties, dict) else set()
            missing = sorted(names - set(node.get("required") or []))
            if missing:
                return (
                    f"In context={where}, 'required' is required to be supplied and to be an "
                    f"array including every key in properties. Missing {missing[0]!r}"
                )
        children: list[tuple[str, Any]] = []
        if isinstance(properties, dict):
            children += [(f"{where}.properties.{k}", v) for k, v in properties.items()]
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                children.append((f"{where}.{key}", node[key]))
        for key in ("anyOf", "allOf", "oneOf"):
            children += [(f"{where}.{key}[{i}]", v) for i, v in enumerate(node.get(key) or [])]
        for key in ("$defs", "definitions"):
            children += [(f"{where}.{key}.{k}", v) for k, v in (node.get(key) or {}).items()]
        for child_where, child in children:
            if (problem := walk(child, child_where, depth + 1)) is not None:
                return problem
        return None

    return walk(schema, "()", 0)


def schema_answer(schema: dict[str, Any], customer: str) -> dict[str, Any]:
    """An object meant to match `schema`, filled from the routing decision for `customer`."""
    built = _Builder(schema, routing_decision(customer)).value(schema, "", 0)
    return built if isinstance(built, dict) else {"answer": built}


class _Builder:
    def __init__(self, root: dict[str, Any], decision: dict[str, Any]) -> None:
        self.root = root
        self.decision = decision
        self.validator_class = validators.validator_for(root)

    def value(self, node: Any, name: str, depth: int) -> Any:
        if not isinstance(node, dict) or depth > _MAX_DEPTH:
            return None
        node = self._resolved(node)
        if "const" in node:
            return node["const"]
        if isinstance(node.get("enum"), list) and node["enum"]:
            return self._member(node["enum"])
        for key in ("anyOf", "oneOf"):
            options = [o for o in node.get(key) or [] if not _is_null(o)]
            if options:
                return self.value(options[0], name, depth + 1)
        if name in self.decision and self._fits(self.decision[name], node):
            return self.decision[name]
        if node.get("allOf"):
            merged: dict[str, Any] = {k: v for k, v in node.items() if k != "allOf"}
            for part in node["allOf"]:
                merged |= self._resolved(part) if isinstance(part, dict) else {}
            return self.value(merged, name, depth + 1)
        kind = _kind(node)
        if kind == "object":
            return self._object(node, depth)
        if kind == "array":
            return self._array(node, name, depth)
        if kind == "string":
            return self._string(node, name)
        if kind in ("number", "integer"):
            return self._number(node, kind)
        if kind == "boolean":
            return bool(_HUMAN_NAMES.search(name)) and bool(
                self.decision.get("requires_human_agent")
            )
        return None

    def _resolved(self, node: dict[str, Any]) -> dict[str, Any]:
        """A local `$ref` (`#/$defs/x`, `#/definitions/x`) followed, its siblings kept."""
        seen = 0
        while isinstance(ref := node.get("$ref"), str) and ref.startswith("#/") and seen < 8:
            target: Any = self.root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                break
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            seen += 1
        return node

    def _fits(self, value: Any, node: dict[str, Any]) -> bool:
        try:
            return bool(self.validator_class(node).is_valid(value))
        except Exception:  # a reference this sub-schema cannot resolve alone: build instead
            return False

    def _member(self, options: list[Any]) -> Any:
        """The enum member the routing decision's intent names (billing ~ billing_question)."""
        intent = str(self.decision.get("classified_intent", ""))
        for option in options:
            if isinstance(option, str) and option and (option in intent or intent in option):
                return option
        return options[0]

    def _object(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = node.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {key: self.value(sub, key, depth + 1) for key, sub in properties.items()}

    def _array(self, node: dict[str, Any], name: str, depth: int) -> list[Any]:
        count = max(1, int(node.get("minItems") or 0))
        if isinstance(node.get("maxItems"), int):
            count = min(count, node["maxItems"])
        items = node.get("items")
        return [self.value(items if isinstance(items, dict) else {}, name, depth + 1)] * count

    def _string(self, node: dict[str, Any], name: str) -> str:
        if isinstance(node.get("format"), str) and node["format"] in _EXAMPLE_FORMATS:
            return _EXAMPLE_FORMATS[node["format"]]
        if _REPLY_NAMES.search(name):
            text = str(self.decision["suggested_response"])
        else:
            text = f"(simulated) {name or 'value'}"
        if isinstance(node.get("maxLength"), int):
            text = text[: node["maxLength"]]
        if isinstance(node.get("minLength"), int):
            text = text.ljust(node["minLength"], ".")
        return text

    def _number(self, node: dict[str, Any], kind: str) -> float | int:
        low, high = node.get("minimum"), node.get("maximum")
        if isinstance(node.get("exclusiveMinimum"), (int, float)):
            low = node["exclusiveMinimum"] + (1 if kind == "integer" else 0.01)
        if isinstance(node.get("exclusiveMaximum"), (int, float)):
            high = node["exclusiveMaximum"] - (1 if kind == "integer" else 0.01)
        value: float = float(self.decision["confidence"]) if kind == "number" else 1.0
        if isinstance(low, (int, float)):
            value = max(value, float(low))
        if isinstance(high, (int, float)):
            value = min(value, float(high))
        return round(value) if kind == "integer" else value


def _kind(node: dict[str, Any]) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None and isinstance(node.get("properties"), dict):
        return "object"
    if kind is None and "items" in node:
        return "array"
    return kind if isinstance(kind, str) else None


def _is_null(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "null"
