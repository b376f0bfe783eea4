"""Validators a PII pattern can name, to tell a real card, IBAN, SSN or phone number from digits.

A regex alone over-redacts (order numbers, ticket ids look like cards), so pii.yaml entries may
name one of these checks; `safety.py` looks them up in VALIDATORS when it loads the rules. Each
takes the text a pattern matched (separators included) and says whether it really is what the
pattern is looking for. A regex digit class matches any Unicode decimal digit, so they read
digits with str.isdecimal/int rather than assuming ASCII. Pure functions, no I/O or state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

Validator = Callable[[str], bool]


def luhn(digits: str) -> bool:
    """Payment-card check digit; spaces and dashes are ignored, anything else fails."""
    numbers = [int(ch) for ch in digits if ch.isdecimal()]
    if len(numbers) < 2 or any(not ch.isdecimal() and ch not in " -" for ch in digits):
        return False
    total = 0
    for position, number in enumerate(reversed(numbers)):
        if position % 2 == 1:
            number *= 2
            if number > 9:
                number -= 9
        total += number
    return total % 10 == 0


_SSN_SHAPE = re.compile(r"(\d{3})[- ]?(\d{2})[- ]?(\d{4})")


def ssn(value: str) -> bool:
    """US SSN: area 000, 666 and 900-999, group 00 and serial 0000 are never issued."""
    match = _SSN_SHAPE.fullmatch(value.strip())
    if match is None:
        return False
    area, group, serial = (int(part) for part in match.groups())
    return area not in (0, 666) and area < 900 and group != 0 and serial != 0


# ISO 13616 lengths for the countries callers see most; any other country: 15-34 characters.
IBAN_LENGTHS: Mapping[str, int] = MappingProxyType(
    {
        "AT": 20,
        "BE": 16,
        "CH": 21,
        "DE": 22,
        "ES": 24,
        "FR": 27,
        "GB": 22,
        "IE": 22,
        "IT": 27,
        "NL": 18,
    }
)
_IBAN_SHAPE = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]+", re.ASCII)


def iban(value: str) -> bool:
    """ISO 13616: country length, then mod 97 == 1 with the first four characters moved last."""
    compact = value.replace(" ", "").upper()
    if not compact.isascii() or _IBAN_SHAPE.fullmatch(compact) is None:
        return False
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    # int(ch, 36) maps 0-9 to themselves and A..Z to 10..35, exactly the ISO 13616 mapping.
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def phone(value: str) -> bool:
    """At least 10 digits: a short code or extension is not a phone number worth hiding."""
    return sum(ch.isdecimal() for ch in value) >= 10


VALIDATORS: Mapping[str, Validator] = MappingProxyType(
    {"luhn": luhn, "iban": iban, "ssn": ssn, "phone": phone}
)
