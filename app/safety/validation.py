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

from app.core.errors import OutputInvalid
from app.observability import tracing

Model = TypeVar("Model", bound=BaseModel)

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def strip_code_fences(text: str) -> str:
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text.strip()


class OutputMismatch(OutputInvalid):
    """OutputInvalid with each problem also as `{"path", "message"}`: the path a JSON path into
    the answer (`$` is the answer as a whole), so a caller can act on it without parsing text."""

    def __init__(
        self, message: str, *, raw: str, problems: list[dict[str, str]], streamed: bool = False
    ) -> None:
        lines = [f"{_short_path(p['path'])}: {p['message']}" for p in problems]
        super().__init__(message, raw=raw, errors=lines)
        self.problems = problems
        # a streamed answer's text went out as it came: it is checked once, never repaired
        self.streamed = streamed


class SchemaInvalid(ValueError):
    """The caller's own JSON Schema is not one: the request is wrong (400), not the answer."""


def _short_path(path: str) -> str:
    return path.removeprefix("$").removeprefix(".") or "(root)"


def output_problems(invalid: OutputInvalid) -> list[dict[str, str]]:
    """Each problem as `{"path", "message"}`; one without a known path is the whole answer's."""
    if isinstance(invalid, OutputMismatch):
        return invalid.problems
    return [{"path": "$", "message": error} for error in invalid.errors]


def _json_object(raw: str) -> dict[str, Any]:
    text = strip_code_fences(raw)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = {"path": "$", "message": f"not JSON: {exc}"}
        raise OutputMismatch("output is not JSON", raw=raw, problems=[problem]) from exc
    if not isinstance(data, dict):
        problem = {"path": "$", "message": "not a JSON object"}
        raise OutputMismatch("output is not a JSON object", raw=raw, problems=[problem])
    return data


def check_json_schema(schema: dict[str, Any]) -> None:
    """Raise SchemaInvalid naming the problem when `schema` is not a valid JSON Schema."""
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = exc.json_path if exc.absolute_path else ""
        raise SchemaInvalid(
            "response_format schema is not a valid JSON Schema"
            + (f" (at {where})" if where else "")
            + f": {exc.message}"
        ) from None


def parse_json_schema_output(
    raw: str, schema: dict[str, Any], *, streamed: bool = False
) -> dict[str, Any]:
    """The output as a JSON object valid against a caller's JSON Schema (checked beforehand with
    check_json_schema), or OutputInvalid listing every problem (path: message). `streamed`: the
    text already went to the caller, so the failure says it was not repaired."""
    try:
        data = _json_object(raw)
    except OutputMismatch as invalid:
        invalid.streamed = streamed
        raise
    validator = validators.validator_for(schema)(schema)
    found = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if found:
        problems = [{"path": e.json_path, "message": e.message} for e in found]
        raise OutputMismatch(
            "output breaks the schema", raw=raw, problems=problems, streamed=streamed
        )
    return data


def parse_output(raw: str, schema: type[Model]) -> Model:
    """The validated object, or OutputInvalid listing every problem (path: message)."""
    with tracing.span("safety.validation", {"cxrelay.safety.schema": schema.__name__}):
        data = _json_object(raw)
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            errors = [
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors()
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
