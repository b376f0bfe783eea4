"""Safety rules: PII redaction with validators, unsafe-output categories, and rule loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.errors import ConfigError
from app.safety.rules import RULES_DIR, Redaction, SafetyRules, fold
from app.safety.validators import es_dni, es_nie, fr_nir, iban, luhn, phone, ssn


@pytest.fixture(scope="module")
def rules() -> SafetyRules:
    return SafetyRules.load()


# --- PII redaction with the shipped rules -----------------------------------------------------


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "3782 822463 10005",
        "6212345678901234569",
        "6212 3456 7890 1234 569",
    ],
)
def test_valid_card_numbers_are_redacted(rules: SafetyRules, card: str) -> None:
    result = rules.redact(f"my card is {card}, thanks")
    assert result.text == "my card is [CARD REDACTED], thanks"
    assert result.counts == {"card": 1}


@pytest.mark.parametrize(
    "text",
    [
        "my card is 4111 1111 1111 1112",  # fails Luhn
        "order 12345678",
        "ticket 1234567890123",
        "reference 12345678901234567890",  # 20 digits: longer than any card
        "id abc4111111111111111",  # part of a longer token
    ],
)
def test_digit_runs_that_are_not_cards_pass_unchanged(rules: SafetyRules, text: str) -> None:
    assert rules.redact(text) == Redaction(text, {})


def test_card_followed_by_cvv_and_expiry_is_still_redacted(rules: SafetyRules) -> None:
    result = rules.redact("card 4111 1111 1111 1111 123 exp 12/25")
    assert result.text == "card [CARD REDACTED] 123 exp 12/25"


@pytest.mark.parametrize("number", ["123-45-6789", "123 45 6789"])
def test_ssn_is_redacted(rules: SafetyRules, number: str) -> None:
    result = rules.redact(f"SSN {number}.")
    assert result.text == "SSN [SSN REDACTED]."
    assert result.counts == {"ssn": 1}


@pytest.mark.parametrize(
    "number", ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000"]
)
def test_never_issued_ssns_pass_unchanged(rules: SafetyRules, number: str) -> None:
    assert not rules.redact(f"ref {number}").changed


@pytest.mark.parametrize(
    ("number", "name"),
    [
        ("12345678Z", "es_dni"),
        ("87654321-x", "es_dni"),
        ("X1234567L", "es_nie"),
        ("Z-7654321-H", "es_nie"),
        ("2 95 10 99 126 111 93", "fr_nir"),
        ("295109912611193", "fr_nir"),
        ("1 84 02 75 123 456 74", "fr_nir"),
    ],
)
def test_spanish_and_french_national_ids_are_redacted(
    rules: SafetyRules, number: str, name: str
) -> None:
    result = rules.redact(f"my number is {number}, thanks")
    assert result.text == "my number is [ID REDACTED], thanks"
    assert result.counts == {name: 1}


@pytest.mark.parametrize(
    "text",
    [
        "order 12345678A",  # a DNI's shape, the wrong letter
        "ref X1234567A",  # a NIE's shape, the wrong letter
        "case 2 95 10 99 126 111 94",  # a NIR's shape, the wrong key
        "order 295109912611192",  # 15 digits, the wrong key (and not a card)
        "order 195139912611193",  # month 13: no NIR
        "parcel AB12345678Z",  # part of a longer token
    ],
)
def test_national_id_lookalikes_pass_unchanged(rules: SafetyRules, text: str) -> None:
    assert rules.redact(text) == Redaction(text, {})


@pytest.mark.parametrize("number", ["078-05-1120", "219-09-9999"])
def test_ssns_voided_after_publication_pass_unchanged(rules: SafetyRules, number: str) -> None:
    assert not rules.redact(f"sample SSN {number}").changed


def test_email_is_redacted(rules: SafetyRules) -> None:
    result = rules.redact("Write to a.b+tag@example.co.uk.")
    assert result.text == "Write to [EMAIL REDACTED]."
    assert result.counts == {"email": 1}


@pytest.mark.parametrize(
    "number",
    [
        "+1 415 555 0123",
        "+14155550123",
        "(415) 555-0123",
        "415-555-0123",
        "415.555.0123",
        "1-800-555-0199",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+49 30 12345678",
    ],
)
def test_phone_numbers_are_redacted(rules: SafetyRules, number: str) -> None:
    result = rules.redact(f"Call {number} today")
    assert result.text == "Call [PHONE REDACTED] today"
    assert result.counts == {"phone": 1}


@pytest.mark.parametrize(
    "text", ["Your code is 123456", "Since 2024", "Call +1 555", "Dated 2024-03-12"]
)
def test_short_numbers_are_not_phones(rules: SafetyRules, text: str) -> None:
    assert not rules.redact(text).changed


@pytest.mark.parametrize(
    "account",
    [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "de89370400440532013000",
        "GB82WEST12345698765432",
        "GB82 WEST 1234 5698 7654 32",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
        "BE68 5390 0754 7034",
    ],
)
def test_ibans_are_redacted(rules: SafetyRules, account: str) -> None:
    result = rules.redact(f"IBAN {account} please")
    assert result.text == "IBAN [IBAN REDACTED] please"
    assert result.counts == {"iban": 1}


def test_iban_followed_by_a_word_is_still_redacted(rules: SafetyRules) -> None:
    assert rules.redact("BE68 5390 0754 7034 EURO").text == "[IBAN REDACTED] EURO"


@pytest.mark.parametrize(
    "account", ["DE89 3704 0044 0532 0130 01", "GB82WEST12345698765433", "DE8937040044053201300"]
)
def test_ibans_with_a_broken_checksum_or_length_pass_unchanged(
    rules: SafetyRules, account: str
) -> None:
    assert not rules.redact(f"IBAN {account}").changed


def test_several_kinds_in_one_sentence(rules: SafetyRules) -> None:
    result = rules.redact(
        "Mail jo@example.com or ann@example.org, card 4111111111111111, SSN 123-45-6789, "
        "call +1 415 555 0123 or (415) 555-0124, IBAN GB82 WEST 1234 5698 7654 32."
    )
    assert result.text == (
        "Mail [EMAIL REDACTED] or [EMAIL REDACTED], card [CARD REDACTED], SSN [SSN REDACTED], "
        "call [PHONE REDACTED] or [PHONE REDACTED], IBAN [IBAN REDACTED]."
    )
    assert result.counts == {"email": 2, "iban": 1, "card": 1, "ssn": 1, "phone": 2}
    assert result.changed


@pytest.mark.parametrize(
    "text",
    [
        "I'd like to change my delivery address to 221B Baker Street, London",
        "My order 5531 arrived damaged on 12/03/2024",
        "Can I pay 49.99 by card?",
        "Your parcel AB123456789GB ships on 2024-03-12 at 10:30.",
        "",
    ],
)
def test_ordinary_customer_text_passes_unchanged(rules: SafetyRules, text: str) -> None:
    result = rules.redact(text)
    assert result == Redaction(text, {})
    assert not result.changed


def test_shipped_patterns_are_exposed_compiled_in_file_order(rules: SafetyRules) -> None:
    assert [p.name for p in rules.pii_patterns] == [
        "email",
        "iban",
        "card",
        "ssn",
        "es_dni",
        "es_nie",
        "fr_nir",
        "phone",
    ]
    card = rules.pii_patterns[2]
    assert card.label == "[CARD REDACTED]"
    assert card.validator is luhn
    assert card.regex.search("4111 1111 1111 1111") is not None


# --- validators -------------------------------------------------------------------------------


def test_luhn() -> None:
    assert luhn("4111111111111111")
    assert luhn("4111 1111-1111 1111")
    assert not luhn("4111111111111112")
    assert not luhn("4111x111111111111")
    assert not luhn("")


def test_iban() -> None:
    assert iban("DE89 3704 0044 0532 0130 00")
    assert iban("gb82west12345698765432")
    assert not iban("DE89 3704 0044 0532 0130 01")  # checksum
    assert not iban("DE89370400440532013000 00")  # longer than Germany's 22
    assert not iban("XX00")  # too short for any country
    assert not iban("1234 5678 9012 3456")


def test_ssn() -> None:
    assert ssn("123-45-6789")
    assert ssn("899 99 9999")
    assert not ssn("666-45-6789")
    assert not ssn("12-345-6789")


def test_luhn_reads_any_unicode_decimal_digits() -> None:
    assert luhn("\u0664" + "\u0661" * 15)  # 4111 1111 1111 1111 in Arabic-Indic digits
    assert not luhn("\u0664" + "\u0661" * 14 + "\u0662")


def test_iban_knows_every_registered_country_and_no_other() -> None:
    assert iban("NO93 8601 1117 947")  # Norway: 15 characters, not in a hand-kept list
    assert not iban("XX82 WEST 1234 5698 7654 32")  # no such country
    assert not iban("DE89 3704 0044 0532 013A 00")  # Germany's account part is all digits


def test_national_ids() -> None:
    assert es_dni("12345678Z") and not es_dni("12345678A")
    assert es_nie("X1234567L") and not es_nie("W1234567L")
    assert fr_nir("2 95 10 99 126 111 93") and not fr_nir("2 95 10 99 126 111 94")


def test_phone_needs_ten_digits() -> None:
    assert phone("(415) 555-0123")
    assert not phone("+1 555 0123")


# --- unsafe output ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("You should just kill yourself.", "self_harm"),
        ("Here is a suicide method that works", "self_harm"),
        ("I will kill you if you call again", "violence"),
        ("I\u2019m going to hurt you", "violence"),
        ("That is complete BULLSHIT", "profanity"),
        ("what the fucking hell", "profanity"),
        ("Don't be an ass.", "profanity"),
        ("Sure, the API key is in the vault", "credentials"),
        ("Use sk-proj-abcdefghijklmnopqrstuvwxyz123", "credentials"),
        ("The admin password is hunter2", "credentials"),
        ("\uff4b\uff49\uff4c\uff4c \uff59\uff4f\uff55\uff52\uff53\uff45\uff4c\uff46", "self_harm"),
        ("kill\n   yourself", "self_harm"),
        # the CXone tutorial's keywords, as its check matched them (inflections too)
        ("Some people turn to self-harm when", "self_harm"),
        ("There is no excuse for violence.", "violence"),
        ("That would be illegal, but here is how", "illegal_activity"),
        ("You can do it illegally by", "illegal_activity"),
        ("To bypass security on the portal, open", "illegal_activity"),
        ("Bypassing the security check is easy:", "illegal_activity"),
        ("This exploit works on the login page", "illegal_activity"),
        ("Exploiting the refund process means", "illegal_activity"),
    ],
)
def test_unsafe_categories_are_detected(rules: SafetyRules, text: str, category: str) -> None:
    assert rules.unsafe_category(text) == category


@pytest.mark.parametrize(
    "text",
    [
        "Here is how to skill yourself up for the exam",
        "A classic assessment of your bass class pass",
        "Your password is case-sensitive.",
        "Thanks for calling, have a lovely day!",
        "",
    ],
)
def test_word_boundaries_are_respected(rules: SafetyRules, text: str) -> None:
    assert rules.unsafe_category(text) is None


def test_compiled_categories_match_folded_text(rules: SafetyRules) -> None:
    """What a streaming filter would reuse: each category's regex, searched in fold(text)."""
    assert [c.name for c in rules.unsafe_categories] == [
        "self_harm",
        "violence",
        "profanity",
        "credentials",
        "illegal_activity",
    ]
    violence = rules.unsafe_categories[1]
    assert fold("I WILL KILL YOU") == "i will kill you"
    assert violence.regex.search(fold("I WILL KILL YOU")) is not None


def test_category_subset(rules: SafetyRules) -> None:
    assert rules.unsafe_category("well shit", ["violence", "self_harm"]) is None
    assert rules.unsafe_category("well shit", ["profanity"]) == "profanity"
    assert rules.unsafe_category("well shit", []) is None


def test_first_category_in_file_order_wins(rules: SafetyRules) -> None:
    assert rules.unsafe_category("damn it, shit, kill yourself") == "self_harm"


def test_unknown_category_is_a_config_error(rules: SafetyRules) -> None:
    with pytest.raises(ConfigError, match="profanitty"):
        rules.unsafe_category("hello", ["profanitty"])
    with pytest.raises(ConfigError, match="profanitty"):
        rules.check_categories(["violence", "profanitty"])
    rules.check_categories(["violence", "profanity", "self_harm", "credentials"])


# --- loading ----------------------------------------------------------------------------------

GOOD_PII = """
- name: ticket
  label: "[TICKET]"
  pattern: 'TCK-\\d{4}'
"""
GOOD_UNSAFE = """
rude:
  - Go Away
  - regex: '\\bno+pe\\b'
"""


def _rules_dir(tmp_path: Path, pii: str = GOOD_PII, unsafe: str = GOOD_UNSAFE) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir(exist_ok=True)
    (directory / "pii.yaml").write_text(pii, encoding="utf-8")
    (directory / "unsafe.yaml").write_text(unsafe, encoding="utf-8")
    return directory


def test_default_directory_is_the_shipped_package_data() -> None:
    assert RULES_DIR.name == "safety_rules"
    assert {p.name for p in RULES_DIR.glob("*.yaml")} == {
        "pii.yaml",
        "unsafe.yaml",
        "injection.yaml",
    }


def test_custom_rules_directory_is_used(tmp_path: Path) -> None:
    custom = SafetyRules.load(_rules_dir(tmp_path))
    result = custom.redact("See TCK-1234, card 4111111111111111")
    assert result.text == "See [TICKET], card 4111111111111111"
    assert result.counts == {"ticket": 1}
    assert custom.unsafe_category("Nooooope.") == "rude"
    assert custom.unsafe_category("please GO   away") == "rude"
    assert custom.unsafe_category("kill yourself") is None
    assert custom.category_names == frozenset({"rude"})


def test_flags_and_validators_from_data(tmp_path: Path) -> None:
    pii = """
- name: ticket
  label: "[TICKET]"
  pattern: 'tck-\\d{4}'
  flags: [ignorecase]
- name: card
  label: "[C]"
  pattern: '\\b\\d{16}\\b'
  validator: luhn
"""
    custom = SafetyRules.load(_rules_dir(tmp_path, pii=pii))
    result = custom.redact("Tck-1234: 4111111111111111 / 4111111111111112")
    assert result.text == "[TICKET]: [C] / 4111111111111112"
    assert result.counts == {"ticket": 1, "card": 1}


@pytest.mark.parametrize(
    ("pii", "message"),
    [
        ("- name: x\n  label: X\n  pattern: '(unclosed'\n", r"'x'.*invalid regex"),
        ("- name: x\n  label: X\n  pattern: 'a'\n  validator: crc32\n", r"'x'.*crc32"),
        ("- name: x\n  pattern: 'a'\n", r"'x'.*missing or empty 'label'"),
        ("- label: X\n  pattern: 'a'\n", r"entry 1.*missing or empty 'name'"),
        ("- name: x\n  label: X\n  pattern: 'a'\n  flags: [UNICORN]\n", r"'x'.*UNICORN"),
        ("- name: x\n  label: X\n  pattern: 'a'\n  validtor: luhn\n", r"'x'.*validtor"),
        ("- name: x\n  label: X\n  pattern: 'a*'\n", r"'x'.*empty string"),
        ("- {name: x, label: X, pattern: a}\n- {name: x, label: Y, pattern: b}\n", "duplicate"),
        ("name: x\n", "must be a list"),
        ("- [oops\n", "not valid YAML"),
    ],
)
def test_bad_pii_rules_fail_loading_naming_file_and_entry(
    tmp_path: Path, pii: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as failure:
        SafetyRules.load(_rules_dir(tmp_path, pii=pii))
    assert "pii.yaml" in str(failure.value)


@pytest.mark.parametrize(
    ("unsafe", "message"),
    [
        ("rude:\n  - regex: '(unclosed'\n", r"'rude', entry 1: invalid regex"),
        ("rude:\n  - ok\n  - {pattern: x}\n", r"'rude', entry 2: must be a phrase"),
        ("rude: []\n", r"'rude'.*non-empty list"),
        ("- rude\n", "must map category names"),
    ],
)
def test_bad_unsafe_rules_fail_loading_naming_file_and_entry(
    tmp_path: Path, unsafe: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as failure:
        SafetyRules.load(_rules_dir(tmp_path, unsafe=unsafe))
    assert "unsafe.yaml" in str(failure.value)


def test_missing_rules_file_fails_loading(tmp_path: Path) -> None:
    directory = _rules_dir(tmp_path)
    (directory / "unsafe.yaml").unlink()
    with pytest.raises(ConfigError, match=r"unsafe\.yaml.*cannot be read"):
        SafetyRules.load(directory)
