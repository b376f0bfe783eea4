"""Validation of model output against a pydantic model or a caller's JSON Schema, and the one
repair prompt.

Models often wrap JSON in markdown fences or add a word before it; fences are tolerated, but the
object itself must match the schema exactly. When it does not, the model is shown its own output
and the errors once (`repair_messages`); the caller decides whether the deadline allows that.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from jsonschema import SchemaError, validators
from pydantic import BaseModel, ValidationError

from app.errors import OutputInvalid

Model = TypeVar("Model", bound=BaseModel)

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def strip_code_fences(text: str) -> str:
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text.strip()


def _json_object(raw: str) -> dict[str, Any]:
    text = strip_code_fences(raw)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputInvalid("output is not JSON", raw=raw, errors=[f"not JSON: {exc}"]) from exc
    if not isinstance(data, dict):
        raise OutputInvalid("output is not a JSON object", raw=raw, errors=["not a JSON object"])
    return data


def check_json_schema(schema: dict[str, Any]) -> None:
    """Raise ValueError naming the problem when `schema` is not a valid JSON Schema."""
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(
            f"response_format schema is not a valid JSON Schema: {exc.message}"
        ) from None


def parse_json_schema_output(raw: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The output as a JSON object valid against a caller's JSON Schema (checked beforehand with
    check_json_schema), or OutputInvalid listing every problem (path: message)."""
    data = _json_object(raw)
    validator = validators.validator_for(schema)(schema)
    problems = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if problems:
        errors = [
            f"{e.json_path.removeprefix('$').removeprefix('.') or '(root)'}: {e.message}"
            for e in problems
        ]
        raise OutputInvalid("output breaks the schema", raw=raw, errors=errors)
    return data


def parse_output(raw: str, schema: type[Model]) -> Model:
    """The validated object, or OutputInvalid listing every problem (path: message)."""
    data = _json_object(raw)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = [
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        ]
        raise OutputInvalid("output breaks the schema", raw=raw, errors=errors) from exc


def repair_messages(
    messages: list[dict[str, str]],
    invalid: OutputInvalid,
    schema: type[BaseModel] | dict[str, Any],
) -> list[dict[str, str]]:
    """The original conversation plus the invalid answer and what was wrong with it."""
    json_schema = schema if isinstance(schema, dict) else schema.model_json_schema()
    instructions = (
        "Your previous answer was not valid. Problems:\n- "
        + "\n- ".join(invalid.errors[:20])
        + "\n\nAnswer again with only one JSON object that matches this JSON Schema exactly:\n"
        + json.dumps(json_schema, separators=(",", ":"))
    )
    return [
        *messages,
        {"role": "assistant", "content": invalid.raw[:4000]},
        {"role": "user", "content": instructions},
    ]
