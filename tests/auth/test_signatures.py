"""Inbound webhook authentication: HMAC, Standard Webhooks, API keys, and the replay guard."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable, Sequence

import pytest
from starlette.datastructures import Headers

from app.auth.signatures import (
    ReplayGuard,
    WebhookAuthenticator,
    fingerprint,
    sign_hmac,
    sign_standard_webhook,
)
from app.core.errors import AuthenticationFailed
from app.core.principal import Principal

SECRET = "first-webhook-secret"
OTHER_SECRET = "second-webhook-secret"
API_KEY = "api-key-0123456789abcdef"
WHSEC = "whsec_" + base64.b64encode(b"raw-standard-webhooks-key-bytes!").decode()
TOLERANCE = 300
BODY = b'{"conversationId":"contact-42","lastMessage":"I was charged twice"}'
ALL_SCHEMES = ("hmac", "standard_webhooks", "api_key")


def make_auth(
    *,
    secrets: Sequence[str] = (SECRET,),
    api_keys: Sequence[str] = (API_KEY,),
    schemes: Iterable[str] = ALL_SCHEMES,
    allow_unauthenticated: bool = False,
    replay_guard: ReplayGuard | None = None,
) -> WebhookAuthenticator:
    return WebhookAuthenticator(
        secrets=list(secrets),
        api_keys=list(api_keys),
        schemes=schemes,
        tolerance_seconds=TOLERANCE,
        replay_guard=replay_guard or ReplayGuard(ttl_seconds=2 * TOLERANCE),
        allow_unauthenticated=allow_unauthenticated,
    )


def sw_headers(
    secret: str = SECRET,
    message_id: str = "msg_1",
    timestamp: int | None = None,
    body: bytes = BODY,
) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard_webhook(secret, message_id, ts, body),
    }


# --- HMAC ---------------------------------------------------------------------------------------


def test_hmac_signature_with_prefix_is_accepted() -> None:
    principal = make_auth().authenticate({"x-webhook-signature": sign_hmac(SECRET, BODY)}, BODY)
    assert principal.scheme == "hmac"
    assert principal.role == "webhook"
    assert principal.key_id == fingerprint(SECRET)


def test_hmac_signature_without_prefix_is_accepted() -> None:
    bare = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    principal = make_auth().authenticate({"x-webhook-signature": bare}, BODY)
    assert principal.scheme == "hmac"


def test_hmac_signature_in_uppercase_hex_is_accepted() -> None:
    upper = "sha256=" + hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest().upper()
    assert make_auth().authenticate({"x-webhook-signature": upper}, BODY).scheme == "hmac"


def test_hmac_tampered_body_is_rejected() -> None:
    headers = {"x-webhook-signature": sign_hmac(SECRET, BODY)}
    tampered = BODY.replace(b"twice", b"once!")
    with pytest.raises(AuthenticationFailed, match="X-Webhook-Signature"):
        make_auth().authenticate(headers, tampered)


def test_hmac_wrong_secret_is_rejected() -> None:
    headers = {"x-webhook-signature": sign_hmac("not-the-secret", BODY)}
    with pytest.raises(AuthenticationFailed):
        make_auth().authenticate(headers, BODY)


def test_hmac_signature_of_a_different_body_is_rejected() -> None:
    headers = {"x-webhook-signature": sign_hmac(SECRET, b'{"other":"body"}')}
    with pytest.raises(AuthenticationFailed):
        make_auth().authenticate(headers, BODY)


def test_hmac_empty_header_is_rejected() -> None:
    with pytest.raises(AuthenticationFailed):
        make_auth().authenticate({"x-webhook-signature": ""}, BODY)


def test_rotation_accepts_either_secret_with_distinct_key_ids() -> None:
    auth = make_auth(secrets=[SECRET, OTHER_SECRET])
    first = auth.authenticate({"x-webhook-signature": sign_hmac(SECRET, BODY)}, BODY)
    second = auth.authenticate({"x-webhook-signature": sign_hmac(OTHER_SECRET, BODY)}, BODY)
    assert first.key_id != second.key_id
    assert first.key_id == fingerprint(SECRET)
    assert second.key_id == fingerprint(OTHER_SECRET)
    for principal, secret in ((first, SECRET), (second, OTHER_SECRET)):
        assert principal.key_id != secret
        assert secret not in principal.key_id
        assert secret not in repr(principal)


def test_headers_are_case_insensitive_with_starlette_headers() -> None:
    """The router passes Starlette's Headers; names sent in any case must still be found.

    (Starlette lower-cases names given as a mapping; ASGI servers lower-case raw names.)
    """
    mixed = {
        "Content-Type": "application/json",
        "X-Webhook-Signature": sign_hmac(SECRET, BODY),
    }
    assert make_auth().authenticate(Headers(headers=mixed), BODY).scheme == "hmac"
    assert make_auth().authenticate(Headers(headers={"X-Api-KEY": API_KEY}), BODY).scheme == (
        "api_key"
    )
    standard = {name.title(): value for name, value in sw_headers().items()}
    assert make_auth().authenticate(Headers(headers=standard), BODY).scheme == ("standard_webhooks")


# --- Standard Webhooks --------------------------------------------------------------------------


def test_standard_webhooks_with_plain_secret_is_accepted() -> None:
    principal = make_auth().authenticate(sw_headers(), BODY)
    assert principal.scheme == "standard_webhooks"
    assert principal.key_id == fingerprint(SECRET)


def test_standard_webhooks_with_whsec_secret_is_accepted() -> None:
    auth = make_auth(secrets=[WHSEC])
    principal = auth.authenticate(sw_headers(secret=WHSEC), BODY)
    assert principal.scheme == "standard_webhooks"
    assert principal.key_id == fingerprint(WHSEC)


def test_standard_webhooks_whsec_key_is_the_decoded_bytes() -> None:
    """A sender that signs with the base64-decoded key (as the spec says) is accepted."""
    ts = int(time.time())
    key = base64.b64decode(WHSEC.removeprefix("whsec_"))
    digest = hmac.new(key, f"msg_1.{ts}.".encode() + BODY, hashlib.sha256).digest()
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }
    assert make_auth(secrets=[WHSEC]).authenticate(headers, BODY).scheme == "standard_webhooks"


def test_standard_webhooks_several_signatures_one_matches() -> None:
    headers = sw_headers()
    wrong = sw_headers(secret="another-secret")["webhook-signature"]
    headers["webhook-signature"] = (
        f"v1,{base64.b64encode(b'x' * 32).decode()} {wrong} " + (headers["webhook-signature"])
    )
    assert make_auth().authenticate(headers, BODY).scheme == "standard_webhooks"


def test_standard_webhooks_tampered_body_is_rejected() -> None:
    with pytest.raises(AuthenticationFailed, match="webhook-signature"):
        make_auth().authenticate(sw_headers(), BODY + b" ")


def test_standard_webhooks_tampered_id_is_rejected() -> None:
    headers = sw_headers(message_id="msg_1")
    headers["webhook-id"] = "msg_2"
    with pytest.raises(AuthenticationFailed, match="webhook-signature"):
        make_auth().authenticate(headers, BODY)


def test_standard_webhooks_tampered_timestamp_is_rejected() -> None:
    headers = sw_headers()
    headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    with pytest.raises(AuthenticationFailed, match="webhook-signature"):
        make_auth().authenticate(headers, BODY)


def test_standard_webhooks_tampered_signature_is_rejected() -> None:
    headers = sw_headers()
    digest = bytearray(base64.b64decode(headers["webhook-signature"].removeprefix("v1,")))
    digest[0] ^= 0x01
    headers["webhook-signature"] = "v1," + base64.b64encode(bytes(digest)).decode()
    with pytest.raises(AuthenticationFailed, match="webhook-signature"):
        make_auth().authenticate(headers, BODY)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp"])
def test_standard_webhooks_missing_id_or_timestamp_is_rejected(missing: str) -> None:
    headers = sw_headers()
    del headers[missing]
    with pytest.raises(AuthenticationFailed, match="webhook-id and webhook-timestamp"):
        make_auth().authenticate(headers, BODY)


def test_standard_webhooks_non_integer_timestamp_is_rejected() -> None:
    headers = sw_headers()
    headers["webhook-timestamp"] = headers["webhook-timestamp"] + ".5"
    with pytest.raises(AuthenticationFailed, match="whole seconds"):
        make_auth().authenticate(headers, BODY)


@pytest.mark.parametrize("offset", [-(TOLERANCE + 10), TOLERANCE + 10])
def test_standard_webhooks_timestamp_outside_tolerance_is_rejected(offset: int) -> None:
    headers = sw_headers(timestamp=int(time.time()) + offset)
    with pytest.raises(AuthenticationFailed, match="webhook-timestamp"):
        make_auth().authenticate(headers, BODY)


def test_standard_webhooks_timestamp_inside_tolerance_is_accepted() -> None:
    headers = sw_headers(timestamp=int(time.time()) - (TOLERANCE - 30))
    assert make_auth().authenticate(headers, BODY).scheme == "standard_webhooks"


def test_standard_webhooks_replay_is_rejected_new_id_passes() -> None:
    auth = make_auth()
    headers = sw_headers(message_id="msg_replayed")
    auth.authenticate(headers, BODY)
    with pytest.raises(AuthenticationFailed, match="replay"):
        auth.authenticate(headers, BODY)
    assert auth.authenticate(sw_headers(message_id="msg_new"), BODY).scheme == "standard_webhooks"


def test_standard_webhooks_invalid_signature_does_not_consume_the_id() -> None:
    auth = make_auth()
    forged = sw_headers(secret="attacker-secret", message_id="msg_fresh")
    with pytest.raises(AuthenticationFailed, match="invalid webhook-signature"):
        auth.authenticate(forged, BODY)
    genuine = sw_headers(message_id="msg_fresh")
    assert auth.authenticate(genuine, BODY).scheme == "standard_webhooks"


# --- API keys -----------------------------------------------------------------------------------


def test_api_key_in_x_api_key_header_is_accepted() -> None:
    principal = make_auth().authenticate({"x-api-key": API_KEY}, BODY)
    assert principal.scheme == "api_key"
    assert principal.key_id == fingerprint(API_KEY)
    assert principal.key_id != API_KEY


def test_api_key_in_authorization_apikey_is_accepted() -> None:
    principal = make_auth().authenticate({"authorization": f"ApiKey {API_KEY}"}, BODY)
    assert principal.scheme == "api_key"


def test_wrong_api_key_is_rejected() -> None:
    with pytest.raises(AuthenticationFailed, match="unknown API key"):
        make_auth().authenticate({"x-api-key": API_KEY + "x"}, BODY)


def test_bearer_token_is_not_an_api_key() -> None:
    with pytest.raises(AuthenticationFailed, match="missing webhook credential"):
        make_auth().authenticate({"authorization": f"Bearer {API_KEY}"}, BODY)


# --- scheme selection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("disabled", "headers"),
    [
        ("hmac", {"x-webhook-signature": sign_hmac(SECRET, BODY)}),
        ("api_key", {"x-api-key": API_KEY}),
        ("standard_webhooks", None),
    ],
)
def test_scheme_not_enabled_is_not_accepted(disabled: str, headers: dict[str, str] | None) -> None:
    enabled = [s for s in ALL_SCHEMES if s != disabled]
    presented = sw_headers() if headers is None else headers
    with pytest.raises(AuthenticationFailed):
        make_auth(schemes=enabled).authenticate(presented, BODY)


def test_no_credential_names_the_headers_to_send() -> None:
    with pytest.raises(AuthenticationFailed) as failure:
        make_auth().authenticate({"content-type": "application/json"}, BODY)
    assert "X-Webhook-Signature" in str(failure.value)
    assert "X-API-Key" in str(failure.value)


def test_allow_unauthenticated_gives_an_anonymous_principal() -> None:
    principal = make_auth(allow_unauthenticated=True).authenticate({}, BODY)
    assert isinstance(principal, Principal)
    assert principal.role == "anonymous"


def test_allow_unauthenticated_still_rejects_a_wrong_signature() -> None:
    headers = {"x-webhook-signature": sign_hmac("wrong", BODY)}
    with pytest.raises(AuthenticationFailed):
        make_auth(allow_unauthenticated=True).authenticate(headers, BODY)


# --- ReplayGuard --------------------------------------------------------------------------------


def test_replay_guard_first_time_then_not() -> None:
    guard = ReplayGuard(ttl_seconds=60)
    assert guard.first_time("a", now=1000.0) is True
    assert guard.first_time("a", now=1001.0) is False
    assert guard.first_time("b", now=1001.0) is True


def test_replay_guard_entries_expire_after_ttl() -> None:
    guard = ReplayGuard(ttl_seconds=60)
    assert guard.first_time("a", now=1000.0) is True
    assert guard.first_time("a", now=1059.0) is False
    assert guard.first_time("a", now=1061.0) is True


def test_replay_guard_is_bounded_oldest_evicted() -> None:
    guard = ReplayGuard(ttl_seconds=3600, max_entries=3)
    for i, message_id in enumerate(["a", "b", "c", "d"]):
        assert guard.first_time(message_id, now=1000.0 + i) is True
    # "a" was evicted to make room for "d"; the newer ones are still remembered.
    assert guard.first_time("d", now=1010.0) is False
    assert guard.first_time("c", now=1010.0) is False
    assert guard.first_time("a", now=1010.0) is True


def test_replay_guard_full_still_rejects_replay_of_oldest_id() -> None:
    guard = ReplayGuard(ttl_seconds=3600, max_entries=2)
    assert guard.first_time("a", now=1000.0) is True
    assert guard.first_time("b", now=1001.0) is True
    # "a" is still stored and within its TTL: checking it again must say "seen".
    assert guard.first_time("a", now=1002.0) is False
