"""The token endpoint from outside, as an attacker tries it: guessing a client's secret against
the service as users run it (a subprocess, real sockets, several source addresses on loopback),
on one worker and on two workers sharing Redis. Failed guesses are throttled per source address
and per client_id (429 with Retry-After); right secrets use none of the allowance."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import ServiceProcess, running_service
from tests.store.test_store import REDIS_URL

pytestmark = pytest.mark.slow  # the service runs as a process

CLIENT_ID, SECRET = "budget-manager", "the-real-secret"
ENV = {
    "OAUTH_CLIENTS": f"{CLIENT_ID}:{SECRET}:acme;scopes=llm.gateway:invoke",
    "ACCESS_TOKEN_SECRET": "attack-test-signing-secret",
}


def _client(service: ServiceProcess, address: str = "127.0.0.1") -> httpx.Client:
    """A client whose requests come from `address` (any 127.0.0.0/8 address is loopback)."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=service.url, transport=transport, timeout=10)


def _ask(client: httpx.Client, secret: str, client_id: str = CLIENT_ID) -> httpx.Response:
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    return client.post("/api/v1/auth/token", data=form)


def test_guessing_from_one_address_is_throttled_with_retry_after(tmp_path: Path) -> None:
    env = {**ENV, "OAUTH_MAX_FAILURES_PER_ADDRESS": "5", "OAUTH_MAX_FAILURES_PER_CLIENT": "none"}
    with running_service(tmp_path, "--simulate", **env) as service:
        with _client(service, "127.0.0.2") as real:
            for _ in range(20):  # right secrets use none of the allowance
                assert _ask(real, SECRET).status_code == 200
        with _client(service, "127.0.0.3") as attacker:
            answers = [_ask(attacker, f"guess-{i}") for i in range(8)]
            assert [a.status_code for a in answers] == [401] * 5 + [429] * 3
            refused = answers[-1]
            assert refused.json()["error"] == "too_many_attempts"
            assert "this address" in refused.json()["error_description"]
            assert 1 <= int(refused.headers["Retry-After"]) <= 12  # one guess per 12 s
            assert _ask(attacker, SECRET).status_code == 429  # even the right one, from there
        with _client(service, "127.0.0.2") as real:  # the real client elsewhere is not locked out
            assert _ask(real, SECRET).status_code == 200
        logs = service.log_path.read_text()
        assert "guess-" not in logs and SECRET not in logs
        throttled = [r for r in service.logs() if "throttled" in r.get("message", "")]
        assert throttled and throttled[0]["remote"] == "127.0.0.3"


def test_guessing_one_client_from_many_addresses_is_throttled(tmp_path: Path) -> None:
    env = {**ENV, "OAUTH_MAX_FAILURES_PER_ADDRESS": "100", "OAUTH_MAX_FAILURES_PER_CLIENT": "4"}
    with running_service(tmp_path, "--simulate", **env) as service:
        codes = []
        for i in range(6):
            with _client(service, f"127.0.1.{i + 1}") as attacker:
                codes.append(_ask(attacker, f"guess-{i}").status_code)
        assert codes == [401] * 4 + [429] * 2
        with _client(service, "127.0.2.1") as other:  # another client_id is not concerned
            assert _ask(other, "x", client_id="someone-else").status_code == 401


def test_two_workers_on_redis_count_failures_together(tmp_path: Path) -> None:
    """Each attempt on a new connection, so both workers take them: with per-worker counts the
    service as a whole would allow twice the limit."""
    key_prefix = f"cxrelay-test-{uuid.uuid4().hex}:"  # deleted on the way out
    env = {
        **ENV,
        "WORKERS": "2",
        "STORE_BACKEND": "redis",
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": key_prefix,
        "OAUTH_MAX_FAILURES_PER_ADDRESS": "6",
        "BOT_STATE_SECRET": "attack-test-bot-state-secret",
    }
    try:
        with running_service(tmp_path, "--simulate", **env) as service:
            codes = []
            for i in range(10):
                with _client(service, "127.0.3.1") as attacker:  # a new connection each time
                    codes.append(_ask(attacker, f"guess-{i}").status_code)
            assert codes == [401] * 6 + [429] * 4, codes
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{key_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


MALFORMED = [
    ("application/json", json.dumps({"grant_type": "client_credentials"})),
    ("application/x-www-form-urlencoded", "grant_type=client_credentials&grant_type=x"),
    ("application/x-www-form-urlencoded", "%ff%fe=1"),
    ("application/x-www-form-urlencoded", "a=1&&=&b"),
    ("application/x-www-form-urlencoded", "a" * 2_000_000),
]


def test_malformed_token_requests_are_clear_4xx(tmp_path: Path) -> None:
    with running_service(tmp_path, "--simulate", **ENV) as service:
        for content_type, body in MALFORMED:
            answer = httpx.post(
                f"{service.url}/api/v1/auth/token",
                content=body,
                headers={"content-type": content_type},
                timeout=10,
            )
            assert 400 <= answer.status_code < 500, (content_type, body[:40], answer.text)
            message = answer.json().get("error_description") or answer.json().get("detail")
            assert message, answer.text
