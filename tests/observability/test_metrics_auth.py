"""Credentials at the edge, as an operator sees them: /metrics behind METRICS_TOKEN when one is
set, and every failed credential attempt, on every route, counted in
cxrelay_auth_failures_total{route, reason} and logged (route, remote address, reason) without
the secret that was presented."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.auth.signatures import sign_hmac, sign_standard_webhook
from app.core.settings import Settings
from app.main import create_app
from app.observability.metrics import AUTH_FAILURE_REASONS
from tests.helpers import CXONE_WEBHOOK, SECRET, WEBHOOK, trigger
from tests.metric_samples import Labels, labels, samples

METRIC = "cxrelay_auth_failures_total"
CLIENT_KEY, ADMIN_TOKEN = "ck-metrics-auth-0a1b:acme", "admin-metrics-auth-2c3d"
METRICS_TOKEN = "metrics-scrape-token-4e5f"
# What the failing attempts present: none of it may show up in a metric or a log line.
WRONG = "presented-wrong-secret-6a7b8c"
WRONG_SIGNATURE = "sha256=" + "ab" * 32
BODY = json.dumps(trigger()).encode()

Step = Callable[[TestClient], None]


@pytest.fixture
def app(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    @contextmanager
    def run(**overrides: Any) -> Iterator[TestClient]:
        values: dict[str, Any] = {
            "client_api_keys": [SecretStr(CLIENT_KEY)],
            "admin_token": SecretStr(ADMIN_TOKEN),
            "metrics_token": SecretStr(METRICS_TOKEN),
        }
        with TestClient(create_app(make_settings(**{**values, **overrides}))) as tc:
            yield tc

    return run


def _post_401(tc: TestClient, path: str, **kw: Any) -> None:
    response = tc.post(path, **kw)
    assert response.status_code == 401, response.text
    assert WRONG not in response.text


def _get_401(tc: TestClient, path: str, headers: dict[str, str]) -> None:
    response = tc.get(path, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"


def _standard_webhook(tc: TestClient, message_id: str, sent_at: int) -> int:
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(sent_at),
        "webhook-signature": sign_standard_webhook(SECRET, message_id, sent_at, BODY),
    }
    return tc.post(WEBHOOK, content=BODY, headers=headers).status_code


def _expired(tc: TestClient) -> None:
    assert _standard_webhook(tc, "msg-old-1", int(time.time()) - 3600) == 401


def _admin_put(tc: TestClient) -> None:
    response = tc.put("/admin/config", json={}, headers={"X-API-Key": WRONG})
    assert response.status_code == 401


def _replayed(tc: TestClient) -> None:
    now = int(time.time())
    assert _standard_webhook(tc, "msg-replay-1", now) == 200
    assert _standard_webhook(tc, "msg-replay-1", now) == 401


def _ws_refused(tc: TestClient, headers: dict[str, str], first: dict[str, Any] | None) -> None:
    with tc.websocket_connect("/ws/chat", headers=headers) as ws:
        if first is not None:
            ws.send_json(first)
        assert ws.receive_json()["code"] == "unauthorized"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 4401


CASES: list[tuple[str, str, str, Step]] = [
    # Cognigy: each scheme's ways of failing
    ("/webhook/cognigy/fallback", "missing", "none", lambda tc: _post_401(tc, WEBHOOK, json={})),
    (
        "/webhook/cognigy/fallback",
        "invalid",
        "api key",
        lambda tc: _post_401(tc, WEBHOOK, content=BODY, headers={"X-API-Key": WRONG}),
    ),
    (
        "/webhook/cognigy/fallback",
        "invalid",
        "hmac",
        lambda tc: _post_401(
            tc, WEBHOOK, content=BODY, headers={"X-Webhook-Signature": WRONG_SIGNATURE}
        ),
    ),
    (
        "/webhook/cognigy/fallback",
        "malformed",
        "standard webhooks without id",
        lambda tc: _post_401(tc, WEBHOOK, content=BODY, headers={"webhook-signature": "v1,x"}),
    ),
    ("/webhook/cognigy/fallback", "expired", "standard webhooks, an hour old", _expired),
    ("/webhook/cognigy/fallback", "replayed", "standard webhooks twice", _replayed),
    # CXone
    ("/webhook/cxone", "missing", "none", lambda tc: _post_401(tc, CXONE_WEBHOOK, json={})),
    (
        "/webhook/cxone",
        "invalid",
        "wrong value",
        lambda tc: _post_401(tc, CXONE_WEBHOOK, json={}, headers={"Authorization": WRONG}),
    ),
    # client-key routes: the template path, never the path sent
    ("/chat", "missing", "none", lambda tc: _post_401(tc, "/chat", json={})),
    (
        "/v1/chat/completions",
        "invalid",
        "bearer",
        lambda tc: _post_401(
            tc, "/v1/chat/completions", json={}, headers={"Authorization": f"Bearer {WRONG}"}
        ),
    ),
    (
        "/v1/models",
        "invalid",
        "x-api-key",
        lambda tc: _get_401(tc, "/v1/models", {"X-API-Key": WRONG}),
    ),
    ("/budget/status", "missing", "none", lambda tc: _get_401(tc, "/budget/status", {})),
    (
        "/budget/sessions/{session_id}",
        "invalid",
        "bearer",
        lambda tc: _get_401(tc, "/budget/sessions/s-1", {"Authorization": f"Bearer {WRONG}"}),
    ),
    # /ws/chat: on the handshake, or a first frame that is not an auth frame
    (
        "/ws/chat",
        "invalid",
        "handshake key",
        lambda tc: _ws_refused(tc, {"X-API-Key": WRONG}, None),
    ),
    (
        "/ws/chat",
        "invalid",
        "auth frame",
        lambda tc: _ws_refused(tc, {}, {"type": "auth", "api_key": WRONG}),
    ),
    ("/ws/chat", "missing", "no auth frame", lambda tc: _ws_refused(tc, {}, {"messages": []})),
    # the admin API
    (
        "/admin/providers",
        "invalid",
        "bearer",
        lambda tc: _get_401(tc, "/admin/providers", {"Authorization": f"Bearer {WRONG}"}),
    ),
    ("/admin/config", "missing", "x-api-key is not the admin scheme", _admin_put),
    # /metrics with METRICS_TOKEN set
    ("/metrics", "missing", "none", lambda tc: _get_401(tc, "/metrics", {})),
    (
        "/metrics",
        "invalid",
        "bearer",
        lambda tc: _get_401(tc, "/metrics", {"Authorization": f"Bearer {WRONG}"}),
    ),
]


def _failures() -> dict[Labels, float]:
    return samples(METRIC)


def _delta(before: dict[Labels, float]) -> dict[Labels, float]:
    moved = {k: v - before.get(k, 0.0) for k, v in _failures().items()}
    return {k: v for k, v in moved.items() if v}


def _leaks(records: list[logging.LogRecord], *secrets: str) -> list[str]:
    text = "\n".join(json.dumps(r.__dict__, default=str) for r in records)
    return [s for s in secrets if s in text]


@pytest.mark.parametrize(
    ("route", "reason", "step"),
    [(route, reason, step) for route, reason, _, step in CASES],
    ids=[f"{route} {reason} ({how})" for route, reason, how, _ in CASES],
)
def test_each_failed_attempt_is_counted_and_logged_without_the_secret(
    app: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    route: str,
    reason: str,
    step: Step,
) -> None:
    assert reason in AUTH_FAILURE_REASONS
    with app() as tc:
        before = _failures()
        with caplog.at_level(logging.DEBUG):
            step(tc)
        assert _delta(before) == {labels(route=route, reason=reason): 1}
        exposition = tc.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert exposition.status_code == 200
    assert f'{METRIC}{{reason="{reason}",route="{route}"}}' in exposition.text
    failures = [r for r in caplog.records if r.getMessage().endswith("authentication failed")]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    logged = failures[0].__dict__
    assert logged["levelno"] == logging.WARNING
    assert (logged["route"], logged["reason"], logged["remote"]) == (route, reason, "testclient")
    assert logged["detail"]  # what the caller was told
    secrets = (WRONG, WRONG_SIGNATURE.removeprefix("sha256="), METRICS_TOKEN, ADMIN_TOKEN)
    assert _leaks(caplog.records, *secrets) == []
    assert [s for s in secrets if s in exposition.text] == []


def test_routes_that_are_switched_off_count_their_attempts_as_disabled(
    app: Callable[..., Any],
) -> None:
    with app(admin_token=None, cxone_webhook_authorization=[]) as tc:
        before = _failures()
        _get_401(tc, "/admin/providers", {"Authorization": f"Bearer {WRONG}"})
        _post_401(tc, CXONE_WEBHOOK, json={}, headers={"Authorization": WRONG})
        assert _delta(before) == {
            labels(route="/admin/providers", reason="disabled"): 1,
            labels(route="/webhook/cxone", reason="disabled"): 1,
        }


def test_metrics_is_open_without_a_token_and_takes_the_bearer_token_with_one(
    app: Callable[..., Any],
) -> None:
    with app(metrics_token=None) as tc:
        assert tc.get("/metrics").status_code == 200
        assert tc.get("/metrics", headers={"Authorization": "Bearer anything"}).status_code == 200
    with app(metrics_token="") as tc:  # blank, as an empty METRICS_TOKEN= line
        assert tc.get("/metrics").status_code == 200
    with app() as tc:
        for headers in ({}, {"Authorization": METRICS_TOKEN}, {"Authorization": "Bearer no"}):
            _get_401(tc, "/metrics", headers)
        response = tc.get("/metrics", headers={"Authorization": f"bearer {METRICS_TOKEN}"})
        assert response.status_code == 200
        assert response.text.startswith("# HELP")


def test_a_successful_attempt_counts_nothing(app: Callable[..., Any]) -> None:
    with app() as tc:
        before = _failures()
        signed = {"X-Webhook-Signature": sign_hmac(SECRET, BODY)}
        assert tc.post(WEBHOOK, content=BODY, headers=signed).status_code == 200
        key = {"Authorization": f"Bearer {CLIENT_KEY.split(':')[0]}"}
        assert tc.get("/budget/status", headers=key).status_code == 200
        assert (
            tc.get(
                "/admin/providers", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            ).status_code
            == 200
        )
        assert _delta(before) == {}
