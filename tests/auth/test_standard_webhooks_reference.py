"""The Standard Webhooks check against the reference implementation (the `standardwebhooks`
package, the spec authors' own): what it signs, cx-relay accepts, through the real webhook; what it
refuses, cx-relay refuses; and cx-relay's own signer (used by the tests and the README's examples)
produces what it verifies."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.auth.signatures import ReplayGuard, WebhookAuthenticator, sign_standard_webhook
from app.core.errors import AuthenticationFailed

WHSEC = "whsec_" + base64.b64encode(b"the-reference-library-signs-me!!").decode()
BODY = json.dumps(
    {"conversationId": "sw-1", "lastMessage": "Where is my order 123456?", "confidenceScore": 0.4}
).encode()
WEBHOOK = "/webhook/cognigy/fallback"


def reference_headers(
    message_id: str, body: bytes, at: dt.datetime | None = None
) -> dict[str, str]:
    at = at or dt.datetime.now(tz=dt.UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(WHSEC).sign(message_id, at, body),
    }


def authenticator() -> WebhookAuthenticator:
    return WebhookAuthenticator(
        secrets=[WHSEC],
        api_keys=[],
        schemes=["standard_webhooks"],
        tolerance_seconds=300,
        replay_guard=ReplayGuard(ttl_seconds=600),
    )


async def test_a_turn_signed_by_the_reference_library_is_answered(
    app_client: Callable[..., Any],
) -> None:
    async with app_client(cognigy_webhook_secret=[WHSEC]) as client:
        headers = {"Content-Type": "application/json", **reference_headers("msg_ref_1", BODY)}
        answered = await client.post(WEBHOOK, content=BODY, headers=headers)
        assert answered.status_code == 200, answered.text
        assert answered.json()["status"] == "success"
        again = await client.post(WEBHOOK, content=BODY, headers=headers)
        assert again.status_code == 401 and "replay" in again.text


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),  # the body changed
        lambda h, b: ({**h, "webhook-id": "msg_other"}, b),  # another message's signature
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
        lambda h, b: (
            reference_headers("msg_ref_2", b, dt.datetime.now(tz=dt.UTC) - dt.timedelta(hours=1)),
            b,
        ),  # signed an hour ago: outside both tolerances
    ],
)
def test_what_the_reference_refuses_cx_relay_refuses(tamper: Any) -> None:
    headers, body = tamper(reference_headers("msg_ref_2", BODY), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(WHSEC).verify(body, headers, json_parse=False)
    with pytest.raises(AuthenticationFailed):
        authenticator().authenticate(headers, body)


def test_cx_relays_signer_is_what_the_reference_verifies() -> None:
    now = int(dt.datetime.now(tz=dt.UTC).timestamp())
    headers = {
        "webhook-id": "msg_ours",
        "webhook-timestamp": str(now),
        "webhook-signature": sign_standard_webhook(WHSEC, "msg_ours", now, BODY),
    }
    Webhook(WHSEC).verify(BODY, headers, json_parse=False)  # raises when it does not verify
    assert authenticator().authenticate(headers, BODY).scheme == "standard_webhooks"
