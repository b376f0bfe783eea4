"""Property tests of webhook signature verification (app/auth/signatures.py), alone and as the
Cognigy route uses it: for any secret, body, id and timestamp, the right signature is accepted and
any change to the body, the timestamp, the id or the signature is rejected — for HMAC
(`X-Webhook-Signature`) and Standard Webhooks (`webhook-id`, `webhook-timestamp`,
`webhook-signature`).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from app.auth.signatures import (
    ReplayGuard,
    WebhookAuthenticator,
    sign_hmac,
    sign_standard_webhook,
)
from app.core.errors import AuthenticationFailed
from app.core.settings import Settings
from app.main import create_app
from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import FaultPlan
from tests.helpers import SECRET, WEBHOOK, trigger

TOLERANCE = 300
UNIT = settings(max_examples=150, deadline=None, database=None)
# The route's examples share one running app (a fixture): nothing in it depends on the order.
ROUTE = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

secrets = st.one_of(
    st.text(min_size=1, max_size=40),
    st.binary(min_size=1, max_size=40).map(lambda raw: "whsec_" + base64.b64encode(raw).decode()),
)
bodies = st.binary(max_size=512)
# Header values travel as latin-1 without line breaks; an id is one token (no spaces or commas).
message_ids = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","),
    min_size=1,
    max_size=40,
)
offsets = st.integers(-(TOLERANCE - 10), TOLERANCE - 10)


def authenticator(secret: str, schemes: tuple[str, ...] = ("hmac", "standard_webhooks")) -> Any:
    return WebhookAuthenticator(
        secrets=[secret],
        api_keys=[],
        schemes=schemes,
        tolerance_seconds=TOLERANCE,
        replay_guard=ReplayGuard(ttl_seconds=2 * TOLERANCE),
    )


def accepted(auth: WebhookAuthenticator, headers: dict[str, str], body: bytes) -> bool:
    try:
        auth.authenticate(headers, body)
    except AuthenticationFailed:
        return False
    return True


def standard_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_standard_webhook(secret, message_id, timestamp, body),
    }


@st.composite
def changed_bytes(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with one byte changed, or some bytes added or removed."""
    how = draw(st.sampled_from(["flip", "append", "truncate", "prepend"]))
    if how == "flip" and original:
        at = draw(st.integers(0, len(original) - 1))
        bit = 1 << draw(st.integers(0, 7))
        return original[:at] + bytes([original[at] ^ bit]) + original[at + 1 :]
    if how == "truncate" and original:
        return original[: draw(st.integers(0, len(original) - 1))]
    extra = draw(st.binary(min_size=1, max_size=8))
    return extra + original if how == "prepend" else original + extra


@st.composite
def changed_text(draw: st.DrawFn, original: str, alphabet: str) -> str:
    """`original` with one character replaced, dropped or added (always a different string)."""
    at = draw(st.integers(0, len(original) - 1))
    how = draw(st.sampled_from(["replace", "drop", "add"]))
    if how == "drop" and len(original) > 1:
        return original[:at] + original[at + 1 :]
    other = draw(st.sampled_from([c for c in alphabet if c != original[at]]))
    if how == "add":
        return original[:at] + other + original[at:]
    return original[:at] + other + original[at + 1 :]


HEX = "0123456789abcdef"
BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


# --- HMAC ----------------------------------------------------------------------------------------


@UNIT
@given(secret=secrets, body=bodies, prefixed=st.booleans(), upper=st.booleans())
def test_hmac_the_right_signature_is_always_accepted(
    secret: str, body: bytes, prefixed: bool, upper: bool
) -> None:
    signature = sign_hmac(secret, body).removeprefix("sha256=")
    signature = signature.upper() if upper else signature
    header = f"sha256={signature}" if prefixed else signature
    assert accepted(authenticator(secret), {"x-webhook-signature": header}, body)


@UNIT
@given(secret=secrets, body=bodies, data=st.data())
def test_hmac_any_change_to_the_body_is_rejected(secret: str, body: bytes, data: Any) -> None:
    tampered = data.draw(changed_bytes(body))
    assert tampered != body
    assert not accepted(
        authenticator(secret), {"x-webhook-signature": sign_hmac(secret, body)}, tampered
    )


@UNIT
@given(secret=secrets, body=bodies, data=st.data())
def test_hmac_any_change_to_the_signature_is_rejected(secret: str, body: bytes, data: Any) -> None:
    signature = sign_hmac(secret, body).removeprefix("sha256=")
    tampered = data.draw(changed_text(signature, HEX))
    assume(tampered.lower() != signature)
    assert not accepted(authenticator(secret), {"x-webhook-signature": tampered}, body)


@UNIT
@given(secret=secrets, other=secrets, body=bodies)
def test_hmac_a_signature_made_with_another_secret_is_rejected(
    secret: str, other: str, body: bytes
) -> None:
    # HMAC pads a short key with zero bytes: "k" and "k\0" are the same key by design
    assume(other.encode().rstrip(b"\0") != secret.encode().rstrip(b"\0"))
    assert not accepted(
        authenticator(secret), {"x-webhook-signature": sign_hmac(other, body)}, body
    )


# --- Standard Webhooks ---------------------------------------------------------------------------


@UNIT
@given(secret=secrets, body=bodies, message_id=message_ids, offset=offsets)
def test_standard_webhooks_the_right_signature_is_always_accepted(
    secret: str, body: bytes, message_id: str, offset: int
) -> None:
    headers = standard_headers(secret, message_id, int(time.time()) + offset, body)
    assert accepted(authenticator(secret), headers, body)


@UNIT
@given(
    secret=secrets,
    body=bodies,
    message_id=message_ids,
    offset=offsets,
    part=st.sampled_from(["body", "id", "timestamp", "signature"]),
    data=st.data(),
)
def test_standard_webhooks_any_change_to_body_id_timestamp_or_signature_is_rejected(
    secret: str, body: bytes, message_id: str, offset: int, part: str, data: Any
) -> None:
    timestamp = int(time.time()) + offset
    headers = standard_headers(secret, message_id, timestamp, body)
    sent_body = body
    if part == "body":
        sent_body = data.draw(changed_bytes(body))
    elif part == "id":
        headers["webhook-id"] = data.draw(changed_text(message_id, HEX + "_-."))
    elif part == "timestamp":  # another timestamp, still inside the tolerance
        moved = data.draw(st.integers(-5, 5).filter(bool))
        headers["webhook-timestamp"] = str(timestamp + moved)
    else:
        signature = headers["webhook-signature"].removeprefix("v1,")
        headers["webhook-signature"] = "v1," + data.draw(changed_text(signature, BASE64))
    assert not accepted(authenticator(secret), headers, sent_body)


@UNIT
@given(secret=secrets, body=bodies, message_id=message_ids, data=st.data())
def test_standard_webhooks_one_right_signature_among_wrong_ones_is_accepted_once(
    secret: str, body: bytes, message_id: str, data: Any
) -> None:
    """Rotation sends several signatures; the right one counts wherever it is, and only once."""
    timestamp = int(time.time())
    right = standard_headers(secret, message_id, timestamp, body)["webhook-signature"]
    wrong = data.draw(st.lists(st.binary(min_size=32, max_size=32), max_size=3))
    values = ["v1," + base64.b64encode(w).decode() for w in wrong]
    values.insert(data.draw(st.integers(0, len(values))), right)
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(values),
    }
    auth = authenticator(secret)
    assert accepted(auth, headers, body)
    assert not accepted(auth, headers, body)  # the same id again: a replay


# --- through the Cognigy route -------------------------------------------------------------------


@pytest.fixture
def relay(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as client:
        yield client


customer_text = st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200
).filter(str.strip)


def _body(text: str) -> bytes:
    """A trigger of its own conversation: one session's budget is not spent by every example."""
    return json.dumps(trigger(lastMessage=text, conversationId=uuid.uuid4().hex)).encode()


@ROUTE
@given(text=customer_text, data=st.data())
def test_cognigy_route_hmac_right_signature_answers_and_any_change_is_401_and_inert(
    relay: TestClient,
    llm_plan: FaultPlan,
    cxone_state: CXoneSimulatorState,
    text: str,
    data: Any,
) -> None:
    raw = _body(text)
    signature = sign_hmac(SECRET, raw)
    if data.draw(st.booleans(), label="tamper the body (else the signature)"):
        sent, header = data.draw(changed_bytes(raw)), signature
    else:
        sent, header = raw, "sha256=" + data.draw(changed_text(signature[7:], HEX))
        assume(header.lower() != signature)
    calls, tokens = len(llm_plan.requests), cxone_state.token_requests
    refused = relay.post(WEBHOOK, content=sent, headers={"X-Webhook-Signature": header})
    assert refused.status_code == 401, refused.text
    assert "signature" in refused.json()["detail"].lower()
    assert (len(llm_plan.requests), cxone_state.token_requests) == (calls, tokens)

    answered = relay.post(WEBHOOK, content=raw, headers={"X-Webhook-Signature": signature})
    assert answered.status_code == 200, answered.text
    assert answered.json()["status"] == "success"


@ROUTE
@given(
    text=customer_text,
    part=st.sampled_from(["body", "id", "timestamp", "signature"]),
    data=st.data(),
)
def test_cognigy_route_standard_webhooks_right_one_answers_and_any_change_is_401_and_inert(
    relay: TestClient,
    llm_plan: FaultPlan,
    cxone_state: CXoneSimulatorState,
    text: str,
    part: str,
    data: Any,
) -> None:
    raw = _body(text)
    message_id = f"msg_{uuid.uuid4().hex}"  # fresh per example: no replay in play
    timestamp = int(time.time())
    headers = standard_headers(SECRET, message_id, timestamp, raw)
    tampered, sent = dict(headers), raw
    if part == "body":
        sent = data.draw(changed_bytes(raw))
    elif part == "id":
        tampered["webhook-id"] = data.draw(changed_text(message_id, HEX))
    elif part == "timestamp":
        tampered["webhook-timestamp"] = str(timestamp + data.draw(st.integers(-5, 5).filter(bool)))
    else:
        signature = headers["webhook-signature"].removeprefix("v1,")
        tampered["webhook-signature"] = "v1," + data.draw(changed_text(signature, BASE64))
    calls, tokens = len(llm_plan.requests), cxone_state.token_requests
    refused = relay.post(WEBHOOK, content=sent, headers=tampered)
    assert refused.status_code == 401, refused.text
    assert (len(llm_plan.requests), cxone_state.token_requests) == (calls, tokens)

    # the refused attempt did not use up the id: the genuine delivery still goes through
    answered = relay.post(WEBHOOK, content=raw, headers=headers)
    assert answered.status_code == 200, answered.text
    assert answered.json()["status"] == "success"
    assert len(llm_plan.requests) > calls or answered.json()["cached"]
