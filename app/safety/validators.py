"""Validators a PII pattern can name, to tell a real card, IBAN, national ID or phone number from
digits.

A regex alone over-redacts (order numbers, ticket ids look like cards), so pii.yaml entries may
name one of these checks; `rules.py` looks them up in VALIDATORS when it loads the rules. Each
takes the text a pattern matched (separators included) and says whether it really is what the
pattern is looking for. The check digits and issuing rules are python-stdnum's (kept up to date
with the registries: IBAN formats per country, never-issued SSNs); what is ours is the shape a
pattern may match. A regex digit class matches any Unicode decimal digit while stdnum reads
ASCII, so digits are made ASCII first. Pure functions, no I/O or state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.es import dni as _dni
from stdnum.es import nie as _nie
from stdnum.fr import nir as _nir
from stdnum.us import ssn as _ssn

Validator = Callable[[str], bool]


_NO_SEPARATORS = str.maketrans("", "", " -")


def _ascii(value: str) -> str:
    """Unicode decimal digits as ASCII digits; every other character unchanged."""
    if value.isascii():
        return value
    return "".join(str(int(ch)) if ch.isdecimal() else ch for ch in value)


def luhn(digits: str) -> bool:
    """Payment-card check digit; spaces and dashes are ignored, anything else fails."""
    compact = _ascii(digits).translate(_NO_SEPARATORS)
    return len(compact) >= 2 and compact.isdigit() and _luhn.is_valid(compact)


_SSN_SHAPE = re.compile(r"\d{3}([- ]?)\d{2}\1\d{4}")


def ssn(value: str) -> bool:
    """US SSN in its 3-2-4 shape: the SSA's rules (area 000, 666 and 900-999, group 00 and
    serial 0000 are never issued) and the numbers it voided after they were published
    (078-05-1120, ...)."""
    value = _ascii(value.strip())
    shape = _SSN_SHAPE.fullmatch(value)
    return shape is not None and _ssn.is_valid(value.translate(_NO_SEPARATORS))


def iban(value: str) -> bool:
    """ISO 13616: the country's length and account format (every registered country; an
    unknown country code fails), then mod 97 == 1. Not the national checks (bank code lists,
    national check digits): a bank missing from stdnum's copy of a registry must not let a
    customer's account number through unredacted."""
    return value.isascii() and _iban.is_valid(value, check_country=False)


def phone(value: str) -> bool:
    """At least 10 digits: a short code or extension is not a phone number worth hiding."""
    return sum(ch.isdecimal() for ch in value) >= 10


def es_dni(value: str) -> bool:
    """Spanish DNI: eight digits and the check letter (mod 23) that belongs to them."""
    return _dni.is_valid(_ascii(value))


def es_nie(value: str) -> bool:
    """Spanish NIE (foreigners' number): X, Y or Z, seven digits and the check letter."""
    return _nie.is_valid(_ascii(value))


def fr_nir(value: str) -> bool:
    """French social security number (NIR): 13 digits and the two check digits (mod 97)."""
    return _nir.is_valid(_ascii(value))


VALIDATORS: Mapping[str, Validator] = MappingProxyType(
    {
        "luhn": luhn,
        "iban": iban,
        "ssn": ssn,
        "phone": phone,
        "es_dni": es_dni,
        "es_nie": es_nie,
        "fr_nir": fr_nir,
    }
)
