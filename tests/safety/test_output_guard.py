"""OutputGuard on its own, with the shipped safety rules: the hold-back window of a stream, PII
redaction that a split value cannot escape, unsafe blocking, and whole-answer checks."""

from __future__ import annotations

from typing import Any

import pytest

from app.safety.output_guard import OutputGuard
from app.safety.rules import SafetyRules

CARD = "4111 1111 1111 1111"  # passes Luhn
UNSAFE = ("self_harm", "violence", "profanity", "credentials")


@pytest.fixture(scope="module")
def rules() -> SafetyRules:
    return SafetyRules.load()


def guard(rules: SafetyRules, **options: Any) -> OutputGuard:
    return OutputGuard(rules, "test", **options)


def stream(g: OutputGuard, pieces: list[str]) -> list[str]:
    """What the caller receives for each piece, then for finish()."""
    return [g.feed(piece) for piece in pieces] + [g.finish()]


def test_ordinary_text_is_released_at_once_up_to_the_word_being_written(
    rules: SafetyRules,
) -> None:
    g = guard(rules, categories=UNSAFE)
    assert g.feed("Hello, thanks") == "Hello, "  # "thanks" may still grow
    assert g.feed(" for waiting") == "thanks for "
    assert g.feed(". Your parcel left the depot.\n") == "waiting. Your parcel left the depot.\n"
    assert g.finish() == ""
    assert g.released == "Hello, thanks for waiting. Your parcel left the depot.\n"


def test_an_ssn_in_three_chunks_never_appears_in_any_piece(rules: SafetyRules) -> None:
    g = guard(rules)
    out = stream(g, ["Your SSN is 123", "-45-", "6789, as asked. Bye"])
    assert out[0] == "Your SSN is "  # released at once: nothing in it can start an SSN
    assert "".join(out) == "Your SSN is [SSN REDACTED], as asked. Bye"
    assert not any(digit in piece for piece in out for digit in "0123456789")


def test_a_number_that_is_no_pii_is_released_once_it_ends(rules: SafetyRules) -> None:
    g = guard(rules)
    assert g.feed("Order 1234") == "Order "
    assert g.feed("5 ships today") == "12345 ships "


def test_the_start_of_an_unsafe_phrase_is_held_until_it_is_decided(rules: SafetyRules) -> None:
    g = guard(rules, categories=UNSAFE)
    assert g.feed("You could kill") == "You could "
    assert g.feed(" time ") == "kill time "  # not "kill yourself": released
    assert g.feed("or kill ") == "or "
    assert g.feed("yourself") == ""  # still held: "yourselves" would be something else
    assert g.blocked is None
    assert g.feed(" now") == ""  # decided: blocked, and nothing of it went out
    assert g.blocked == "self_harm"
    assert "kill" not in g.released.replace("kill time", "")


def test_a_card_split_over_many_deltas_is_redacted(rules: SafetyRules) -> None:
    g = guard(rules)
    text = f"Your card {CARD} is on file. Thanks"
    out = stream(g, [text[i : i + 2] for i in range(0, len(text), 2)])
    assert "".join(out) == "Your card [CARD REDACTED] is on file. Thanks"
    assert not any(digit in piece for piece in out for digit in "0123456789")
    assert g.redactions == {"card": 1}


def test_an_email_split_mid_address_is_redacted(rules: SafetyRules) -> None:
    g = guard(rules)
    out = stream(g, ["Write to jane", ".doe@exa", "mple.", "com for help.", "\n"])
    assert "".join(out) == "Write to [EMAIL REDACTED] for help.\n"
    assert "jane" not in "".join(out)


def test_max_hold_releases_at_a_word_space_never_inside_a_number(rules: SafetyRules) -> None:
    g = guard(rules, max_hold_chars=40)
    words = "word " * 10  # 50 characters without a sentence end
    out = g.feed(words + "card 4111 1111")
    assert out == words + "card "  # released at the last space after a letter
    assert g.feed(" 1111 1111 is yours") == "[CARD REDACTED] is "  # complete: released
    assert g.finish() == "yours"


def test_max_hold_never_splits_an_iban_with_a_letter_group(rules: SafetyRules) -> None:
    """A British IBAN has a bank code of letters: the space after it is not a word space."""
    g = guard(rules, max_hold_chars=40)
    out = [g.feed("word " * 10 + "GB82 WEST "), g.feed("1234 5698 7654 32 is yours"), g.finish()]
    assert "".join(out) == "word " * 10 + "[IBAN REDACTED] is yours"
    assert not any("WEST" in piece or "GB82" in piece for piece in out)


def test_below_max_hold_a_possible_match_stays_held(rules: SafetyRules) -> None:
    g = guard(rules, max_hold_chars=40)
    assert g.feed("4111 1111 1111") == ""  # could still become a card
    assert g.feed(" 1111") == ""
    assert g.feed(" ok") == "[CARD REDACTED] "


def test_a_long_run_without_word_spaces_is_held_to_the_end(rules: SafetyRules) -> None:
    g = guard(rules, max_hold_chars=10)
    assert g.feed("4111 1111 1111 1111 2222 3333") == ""  # spaces only after digits
    assert g.finish() == "[CARD REDACTED] 2222 3333"  # redacted whole, at the end


def test_finish_releases_the_remainder_once(rules: SafetyRules) -> None:
    g = guard(rules)
    assert g.feed("No end here") == "No end "
    assert g.finish() == "here"
    assert g.finish() == ""
    assert g.released == "No end here"


def test_once_blocked_nothing_more_is_released(rules: SafetyRules) -> None:
    g = guard(rules, categories=UNSAFE)
    assert g.feed("Let me check. ") == "Let me check. "
    assert g.feed("You should kill yourself. ") == ""
    assert g.blocked == "self_harm"
    assert g.feed("Anyway, your parcel is here. ") == ""
    assert g.finish() == ""
    assert g.released == "Let me check. "


def test_unsafe_phrase_across_two_pieces_is_caught(rules: SafetyRules) -> None:
    g = guard(rules, categories=UNSAFE)
    assert g.feed("Go and kill\n") == "Go and "  # "kill" may start a phrase: held
    assert g.feed("yourself. ") == ""
    assert g.blocked == "self_harm"
    assert g.released == "Go and "


def test_no_categories_means_no_blocking(rules: SafetyRules) -> None:
    g = guard(rules)
    assert g.check("You should kill yourself.").text == "You should kill yourself."
    assert g.blocked is None


def test_check_a_whole_answer(rules: SafetyRules) -> None:
    checked = guard(rules, categories=UNSAFE).check(f"Card {CARD}, mail a@b.example. Bye.")
    assert checked.text == "Card [CARD REDACTED], mail [EMAIL REDACTED]. Bye."
    assert checked.blocked is None
    assert checked.redactions == {"email": 1, "card": 1}
    blocked = guard(rules, categories=UNSAFE).check("The admin password is hunter2")
    assert (blocked.text, blocked.blocked) == ("", "credentials")


def test_check_with_a_category_subset(rules: SafetyRules) -> None:
    checked = guard(rules, categories=("profanity",)).check("You should kill yourself.")
    assert checked.blocked is None
    assert guard(rules, categories=("profanity",)).check("this is bullshit").blocked == "profanity"


def test_redaction_can_be_turned_off(rules: SafetyRules) -> None:
    g = guard(rules, redact=False)
    assert g.check(f"Card {CARD}.").text == f"Card {CARD}."
    assert g.redactions == {}


def test_redaction_counts_add_up_over_a_stream(rules: SafetyRules) -> None:
    g = guard(rules)
    stream(g, [f"Card {CARD}. ", "Mail a@b.example. ", f"Again {CARD} and c@d.example."])
    assert g.redactions == {"card": 2, "email": 2}
    assert CARD not in g.released
