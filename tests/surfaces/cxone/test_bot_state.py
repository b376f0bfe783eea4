"""Signed botSessionState: round trip, and every way of forging it starts a new session."""

from __future__ import annotations

import json

from app.surfaces.cxone.bot_state import BotSession, StateCodec

CODEC = StateCodec(b"secret-one", max_bytes=4096)


def _session() -> BotSession:
    session = BotSession.new()
    session.add_exchange("hello", "hi there", max_messages=20, max_chars=8000)
    session.turns, session.no_input_streak, session.failure_streak = 3, 1, 1
    return session


def test_round_trip_keeps_everything_and_marks_it_trusted() -> None:
    original = _session()
    decoded = CODEC.decode(json.loads(json.dumps(CODEC.encode(original))))
    assert decoded.rejected == "" and not decoded.is_new
    assert decoded.payload() == original.payload()


def test_state_handed_back_as_a_json_string_is_accepted() -> None:
    encoded = json.dumps(CODEC.encode(_session()))
    assert CODEC.decode(encoded).rejected == ""


def test_missing_state_is_a_new_session() -> None:
    for raw in (None, "", {}):
        assert CODEC.decode(raw).rejected == "missing"


def test_another_secret_cannot_forge_state() -> None:
    forged = StateCodec(b"attacker", max_bytes=4096).encode(_session())
    assert CODEC.decode(forged).rejected == "tampered"


def test_any_change_to_the_payload_is_detected() -> None:
    encoded = CODEC.encode(_session())
    encoded["state"]["turns"] = 0
    assert CODEC.decode(encoded).rejected == "tampered"


def test_malformed_and_oversized_states_are_rejected() -> None:
    assert CODEC.decode("{not json").rejected == "malformed"
    assert CODEC.decode([1, 2]).rejected == "malformed"
    assert CODEC.decode({"v": 1, "state": "x", "sig": "y"}).rejected == "malformed"
    big = _session()
    big.history = [{"role": "user", "content": "x" * 5000}]
    assert CODEC.decode(CODEC.encode(big)).rejected == "oversized"
    assert CODEC.decode("x" * 5000).rejected == "oversized"


def test_history_bounds_drop_the_oldest_messages() -> None:
    session = BotSession.new()
    for i in range(30):
        session.add_exchange(f"user {i}", f"bot {i}", max_messages=6, max_chars=10_000)
    assert [m["content"] for m in session.history] == [
        "user 27",
        "bot 27",
        "user 28",
        "bot 28",
        "user 29",
        "bot 29",
    ]
    session.add_exchange("y" * 50, "z" * 50, max_messages=6, max_chars=120)
    assert sum(len(m["content"]) for m in session.history) <= 120
    assert session.history[-1]["content"] == "z" * 50
