"""Model output parsing: code fences, strict schema validation, and the repair prompt."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.core.errors import OutputInvalid
from app.safety.validation import parse_output, repair_messages, strip_code_fences
from app.surfaces.cognigy.decision import RoutingDecision

DECISION: dict[str, Any] = {
    "classified_intent": "billing_question",
    "confidence": 0.83,
    "extracted_parameters": {"charge": "duplicate"},
    "suggested_response": "I can look into that double charge for you.",
    "requires_human_agent": False,
}
RAW = json.dumps(DECISION)


def _invalid(raw: str) -> OutputInvalid:
    with pytest.raises(OutputInvalid) as failure:
        parse_output(raw, RoutingDecision)
    assert failure.value.raw == raw
    assert failure.value.errors
    return failure.value


def _with(**changes: Any) -> str:
    return json.dumps({**DECISION, **changes})


# --- strip_code_fences / accepted shapes ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        RAW,
        f"```json\n{RAW}\n```",
        f"```\n{RAW}\n```",
        f"```JSON\n{RAW}\n```\n",
        f"\n\n   {RAW}  \n\t",
        f"  ```json\n{json.dumps(DECISION, indent=2)}\n```  ",
    ],
    ids=["plain", "json-fence", "bare-fence", "upper-fence", "whitespace", "indented-fenced"],
)
def test_accepted_shapes_give_the_decision(raw: str) -> None:
    decision = parse_output(raw, RoutingDecision)
    assert decision.model_dump() == DECISION


def test_strip_code_fences_returns_the_inner_text() -> None:
    assert strip_code_fences('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert strip_code_fences('```\n{"a": 1}\n```') == '{"a": 1}'
    assert strip_code_fences('  {"a": 1}\n') == '{"a": 1}'


def test_strip_code_fences_keeps_backticks_inside_strings() -> None:
    inner = json.dumps({"suggested_response": "use ``` to quote code"})
    assert strip_code_fences(f"```json\n{inner}\n```") == inner


# --- rejected outputs ---------------------------------------------------------------------------


def test_not_json_is_invalid() -> None:
    invalid = _invalid("Sure! The customer wants billing help.")
    assert any("not JSON" in error for error in invalid.errors)


def test_prose_around_json_is_invalid() -> None:
    invalid = _invalid(f"Here is the answer: {RAW}")
    assert any("not JSON" in error for error in invalid.errors)


def test_json_array_is_invalid() -> None:
    invalid = _invalid(json.dumps([DECISION]))
    assert any("not a JSON object" in error for error in invalid.errors)


@pytest.mark.parametrize("field", sorted(DECISION))
def test_missing_key_is_invalid_and_named(field: str) -> None:
    data = {k: v for k, v in DECISION.items() if k != field}
    invalid = _invalid(json.dumps(data))
    assert any(error.startswith(f"{field}:") for error in invalid.errors), invalid.errors


def test_extra_key_is_invalid_and_named() -> None:
    invalid = _invalid(_with(sentiment="angry"))
    assert any(error.startswith("sentiment:") for error in invalid.errors), invalid.errors


@pytest.mark.parametrize("confidence", [1.2, -0.1])
def test_confidence_out_of_range_is_invalid(confidence: float) -> None:
    invalid = _invalid(_with(confidence=confidence))
    assert any(error.startswith("confidence:") for error in invalid.errors), invalid.errors


def test_confidence_as_string_is_invalid() -> None:
    invalid = _invalid(_with(confidence="0.9"))
    assert any(error.startswith("confidence:") for error in invalid.errors), invalid.errors


@pytest.mark.parametrize("flag", ["true", 1, "yes"])
def test_requires_human_agent_must_be_a_real_boolean(flag: object) -> None:
    invalid = _invalid(_with(requires_human_agent=flag))
    assert any(error.startswith("requires_human_agent:") for error in invalid.errors)


def test_empty_intent_is_invalid() -> None:
    invalid = _invalid(_with(classified_intent=""))
    assert any(error.startswith("classified_intent:") for error in invalid.errors)


def test_every_problem_is_listed() -> None:
    invalid = _invalid(json.dumps({"confidence": 3, "requires_human_agent": "no"}))
    fields = {error.split(":", 1)[0] for error in invalid.errors}
    assert {
        "classified_intent",
        "confidence",
        "extracted_parameters",
        "suggested_response",
        "requires_human_agent",
    } <= fields


@pytest.mark.parametrize("confidence", [1, 0])
def test_integer_confidence_is_accepted(confidence: int) -> None:
    decision = parse_output(_with(confidence=confidence), RoutingDecision)
    assert decision.confidence == float(confidence)
    assert isinstance(decision.confidence, float)


# --- repair_messages ----------------------------------------------------------------------------


def test_repair_messages_keeps_the_conversation_and_explains_the_problems() -> None:
    original = [
        {"role": "system", "content": "You are the routing assistant."},
        {"role": "user", "content": "Customer's last message: I was charged twice"},
    ]
    bad_raw = _with(confidence=1.2)
    invalid = _invalid(bad_raw)

    messages = repair_messages(original, invalid, RoutingDecision)

    assert messages[: len(original)] == original
    assert len(messages) == len(original) + 2
    assert messages[-2] == {"role": "assistant", "content": bad_raw}
    assert messages[-1]["role"] == "user"
    feedback = messages[-1]["content"]
    for error in invalid.errors:
        assert error in feedback
    schema = json.dumps(RoutingDecision.model_json_schema(), separators=(",", ":"))
    assert schema in feedback
    assert original == [
        {"role": "system", "content": "You are the routing assistant."},
        {"role": "user", "content": "Customer's last message: I was charged twice"},
    ], "the caller's list must not be modified"


def test_repair_messages_bounds_the_echoed_output() -> None:
    huge = "x" * 10_000
    invalid = _invalid(huge)
    messages = repair_messages([], invalid, RoutingDecision)
    assert messages[0]["role"] == "assistant"
    assert 0 < len(messages[0]["content"]) <= 4000
