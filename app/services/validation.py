"""Validation of model output against a pydantic schema, and the one repair prompt.

Models often wrap JSON in markdown fences or add a word before it; fences are tolerated, but the
object itself must match the schema exactly. When it does not, the model is shown its own output
and the errors once (`repair_messages`); the caller decides whether the deadline allows that.
"""

from __future__ import annotations

import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from app.errors import OutputInvalid

Model = TypeVar("Model", bound=BaseModel)

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def strip_code_fences(text: str) -> str:
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text.strip()


def parse_output(raw: str, schema: type[Model]) -> Model:
    """The validated object, or OutputInvalid listing every problem (path: message)."""
    text = strip_code_fences(raw)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputInvalid("output is not JSON", raw=raw, errors=[f"not JSON: {exc}"]) from exc
    if not isinstance(data, dict):
        raise OutputInvalid("output is not a JSON object", raw=raw, errors=["not a JSON object"])
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = [
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        ]
        raise OutputInvalid("output breaks the schema", raw=raw, errors=errors) from exc


def repair_messages(
    messages: list[dict[str, str]], invalid: OutputInvalid, schema: type[BaseModel]
) -> list[dict[str, str]]:
    """The original conversation plus the invalid answer and what was wrong with it."""
    instructions = (
        "Your previous answer was not valid. Problems:\n- "
        + "\n- ".join(invalid.errors[:20])
        + "\n\nAnswer again with only one JSON object that matches this JSON Schema exactly:\n"
        + json.dumps(schema.model_json_schema(), separators=(",", ":"))
    )
    return [
        *messages,
        {"role": "assistant", "content": invalid.raw[:4000]},
        {"role": "user", "content": instructions},
    ]
