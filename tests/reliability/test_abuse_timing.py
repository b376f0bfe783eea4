"""The timing of credential checks does not depend on how much of a guess is right.

A statistical microbenchmark of the verification call itself: tens of thousands of interleaved
calls whose signature is wrong in its first byte, in its last byte, or everywhere; the medians must
agree within a generous ratio. The harness is shown to catch an early-exit comparison (swapped in
for `hmac.compare_digest`) so a pass means something, and a spy confirms every credential check
goes through `hmac.compare_digest`, once per configured credential (no early exit that would tell
which one matched).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hmac
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr

from app.auth.clients import ClientAuthenticator
from app.auth.signatures import (
    ReplayGuard,
    WebhookAuthenticator,
    sign_hmac,
    sign_standard_webhook,
)
from app.core.errors import AuthenticationFailed
from tests.helpers import API_KEY, CXONE_WEBHOOK, SECRET

CLIENT_KEY = "timing-client-key-6e0c2b"
ADMIN_TOKEN = "timing-admin-token-a93f17"
KEYS: dict[str, Any] = {
    "client_api_keys": [SecretStr(f"{CLIENT_KEY}:acme")],
    "admin_token": SecretStr(ADMIN_TOKEN),
}

ROUNDS = 20_000
RATIO_BOUND = 1.2  # medians of the three variants; a real early exit shows ~1.5 here


def _flip(char: str) -> str:
    return "0" if char != "0" else "1"


def _wrong_variants(right: str) -> dict[str, str]:
    return {
        "first byte wrong": _flip(right[0]) + right[1:],
        "last byte wrong": right[:-1] + _flip(right[-1]),
        "every byte wrong": "".join(_flip(c) for c in right),
    }


def _medians(verify: Callable[[str], object], variants: dict[str, str]) -> dict[str, float]:
    """Median ns per call, the variants interleaved in a shuffled order every round so drift
    and noise on a shared machine fall on all of them alike."""
    samples: dict[str, list[int]] = {name: [] for name in variants}
    order = list(variants.items())
    shuffle = random.Random(8).shuffle
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for _ in range(ROUNDS):
            shuffle(order)
            for name, value in order:
                started = clock()
                with contextlib.suppress(AuthenticationFailed):
                    verify(value)
                samples[name].append(clock() - started)
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


def _spread(medians: dict[str, float]) -> float:
    return max(medians.values()) / min(medians.values())


BODY = b'{"conversationId": "timing-1", "lastMessage": "Where is my order?"}'


def _webhook_auth(**kw: Any) -> WebhookAuthenticator:
    options: dict[str, Any] = {
        "secrets": [SECRET],
        "api_keys": [API_KEY],
        "schemes": ["hmac", "standard_webhooks", "api_key"],
        "tolerance_seconds": 300,
        "replay_guard": ReplayGuard(600),
    }
    return WebhookAuthenticator(**{**options, **kw})


def _hmac_verifier() -> tuple[Callable[[str], object], str]:
    auth = _webhook_auth()
    right = sign_hmac(SECRET, BODY).removeprefix("sha256=")
    return lambda signature: auth.authenticate({"x-webhook-signature": signature}, BODY), right


def test_hmac_verification_time_does_not_depend_on_how_many_bytes_match() -> None:
    verify, right = _hmac_verifier()
    medians = _medians(verify, _wrong_variants(right))
    assert _spread(medians) < RATIO_BOUND, medians


def test_standard_webhooks_verification_time_does_not_depend_on_how_many_bytes_match() -> None:
    auth, timestamp = _webhook_auth(), int(time.time())
    right = sign_standard_webhook(SECRET, "msg_t", timestamp, BODY).removeprefix("v1,")
    headers = {"webhook-id": "msg_t", "webhook-timestamp": str(timestamp)}

    def verify(signature: str) -> object:
        return auth.authenticate({**headers, "webhook-signature": f"v1,{signature}"}, BODY)

    medians = _medians(verify, _wrong_variants(right))
    assert _spread(medians) < RATIO_BOUND, medians


def test_api_key_and_client_key_checks_take_the_same_time_however_close_the_guess() -> None:
    webhook = _webhook_auth()
    clients = ClientAuthenticator([f"{CLIENT_KEY}:acme"], ADMIN_TOKEN)
    for verify, right in (
        (lambda key: webhook.authenticate({"x-api-key": key}, BODY), API_KEY),
        (lambda key: clients.authenticate({"authorization": f"Bearer {key}"}), CLIENT_KEY),
    ):
        medians = _medians(verify, _wrong_variants(right))
        assert _spread(medians) < RATIO_BOUND, medians


def test_the_timing_harness_catches_an_early_exit_comparison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same measurement, with a byte-by-byte comparison that stops at the first
    difference: the spread must exceed the bound, or the tests above prove nothing."""

    def early_exit(a: bytes, b: bytes) -> bool:
        if len(a) != len(b):
            return False
        return all(x == y for x, y in zip(a, b, strict=True))

    monkeypatch.setattr(hmac, "compare_digest", early_exit)
    verify, right = _hmac_verifier()
    medians = _medians(verify, _wrong_variants(right))
    assert _spread(medians) > RATIO_BOUND, medians
    assert medians["last byte wrong"] > medians["first byte wrong"]


class Spy:
    def __init__(self) -> None:
        self.calls: list[tuple[object, object]] = []
        self._real = hmac.compare_digest

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls.append((a, b))
        return self._real(a, b)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    watcher = Spy()
    monkeypatch.setattr(hmac, "compare_digest", watcher)
    return watcher


def test_every_webhook_scheme_compares_with_compare_digest_once_per_secret(spy: Spy) -> None:
    """Three active secrets, the middle one signing: all three are compared (no early exit
    tells which one matched), and only through hmac.compare_digest."""
    secrets = ["secret-one", SECRET, "secret-three"]
    auth = _webhook_auth(secrets=secrets, api_keys=["key-one", API_KEY, "key-three"])
    auth.authenticate({"x-webhook-signature": sign_hmac(SECRET, BODY)}, BODY)
    assert len(spy.calls) == 3
    spy.calls.clear()
    now = int(time.time())
    headers = {
        "webhook-id": "msg_spy",
        "webhook-timestamp": str(now),
        "webhook-signature": sign_standard_webhook(SECRET, "msg_spy", now, BODY),
    }
    auth.authenticate(headers, BODY)
    assert len(spy.calls) == 3
    assert base64.b64decode(spy.calls[1][1])  # the presented signature, as sent
    spy.calls.clear()
    auth.authenticate({"x-api-key": API_KEY}, BODY)
    assert len(spy.calls) == 3
    assert all(len(a) == len(b) == 32 for a, b in spy.calls)  # digests: the length leaks nothing


def test_client_keys_and_the_admin_token_compare_digests_in_constant_time(spy: Spy) -> None:
    clients = ClientAuthenticator(["key-a:acme", f"{CLIENT_KEY}:acme", "key-c:beta"], ADMIN_TOKEN)
    clients.authenticate({"authorization": f"Bearer {CLIENT_KEY}"})
    assert len(spy.calls) == 4  # every client key and the admin token, whichever matched
    assert all(len(a) == len(b) == 32 for a, b in spy.calls)


async def test_the_admin_token_and_cxone_authorization_use_compare_digest(
    app_client: Callable[..., Any], spy: Spy
) -> None:
    async with app_client(**KEYS) as client:
        await client.get("/admin/providers", headers={"Authorization": "Bearer nope"})
        admin_calls = len(spy.calls)
        await client.post(
            CXONE_WEBHOOK, json={"userInput": "hi"}, headers={"Authorization": "Bearer nope"}
        )
    assert admin_calls >= 1
    assert len(spy.calls) > admin_calls
