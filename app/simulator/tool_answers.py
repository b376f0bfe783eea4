"""The simulated model's tool calls, whichever wire it speaks: offered tools, it calls one with
arguments built from the tool's parameter schema; once the caller sends the tool's result back,
it answers in text quoting it. So a two-step tool loop runs end to end against `make run`.
`simulated_answer` picks between a call and the other answers, the same on either wire."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.simulator.answers import conversational_reply, customer_text, routing_decision
from app.simulator.faults import Fault
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


def simulated_answer(
    fault: Fault,
    messages: list[dict[str, Any]],
    *,
    schema: dict[str, Any] | None,
    wants_json: bool,
    tool_result: str | None,
    call_for: Callable[[str], SimulatedCall | None],
) -> tuple[str, SimulatedCall | None]:
    """(content, tool call) answering a conversation, in this order: the fault's content or
    chunks, an object matching `schema`, a routing decision when JSON is asked for, the reply to
    a tool's result, else a conversational reply, maybe with the call `call_for` makes given the
    customer's text."""
    if fault.content is not None:
        return fault.content, None
    if fault.chunks is not None:
        return "".join(fault.chunks), None
    if schema is not None:
        return json.dumps(schema_answer(schema, customer_text(messages))), None
    if wants_json:
        return json.dumps(routing_decision(customer_text(messages))), None
    if tool_result is not None:
        return tool_result_reply(tool_result), None
    return conversational_reply(messages), call_for(customer_text(messages))
