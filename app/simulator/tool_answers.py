"""The simulated model's tool calls, whichever wire it speaks: offered tools, it calls one with
arguments built from the tool's parameter schema; once the caller sends the tool's result back,
it answers in text quoting it. So a two-step tool loop runs end to end against `make run`."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from app.simulator.schema_answers import schema_answer


@dataclass(frozen=True)
class SimulatedCall:
    """A tool call the simulated model makes: its id, the function and the JSON arguments."""

    id: str
    name: str
    arguments: str


def tool_call(
    tools: list[tuple[str, dict[str, Any]]],
    choice: str | None,
    answered: bool,
    customer: str,
) -> SimulatedCall | None:
    """Offered tools (name, JSON Schema of the parameters), the simulated model calls one —
    the one `choice` names, else the first — with arguments built from its schema; once a tool
    result came back (`answered`), or with `choice` "none", it answers in text instead."""
    if not tools or choice == "none" or answered:
        return None
    name, parameters = next(((n, p) for n, p in tools if n == choice), tools[0])
    arguments = schema_answer(parameters, customer) if parameters.get("properties") else {}
    return SimulatedCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments))


def tool_result_reply(result: str) -> str:
    return f"(simulated) The tool answered: {result[:200]}"
