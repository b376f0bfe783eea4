"""/admin/keys through the real app and lifespan (in process): create (the key shown once),
list (masked, with the CLIENT_API_KEYS keys as `environment`), rotate, revoke, the refusals a
person can act on, the audit log, and what a created key may do on the client routes."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from app.auth.signatures import fingerprint
from app.store.audit import DB_FILENAME
from tests.helpers import Captured
from tests.store.test_store import REDIS_URL, redis_prefix

TOKEN = "admin-token-for-key-tests-71c0"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV_KEY = "env-client-key-for-tests-0042"
ENV_ID = fingerprint(ENV_KEY)
HELLO = {"session_id": "s-1", "messages": [{"role": "user", "content": "Where is my parcel?"}]}


def running(app_client: Any, **overrides: Any) -> Any:
    return app_client(
        admin_token=SecretStr(TOKEN),
        client_api_keys=[SecretStr(f"{ENV_KEY}:beta:900;scopes=llm.gateway:invoke")],
        **overrides,
    )


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("tenant", "acme")
    response = await client.post("/admin/keys", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_created_key_is_shown_once_listed_masked_and_works_at_once(
    app_client: Any, tmp_path: Path
) -> None:
    async with running(app_client) as client:
        assert (
            await client.post("/chat", json=HELLO, headers=bearer("cxr_nope"))
        ).status_code == 401
        created = await create(
            client, name="billing bot", scopes=["llm.gateway:invoke"], session_tokens=4000
        )
        key = created["key"]
        assert key.startswith("cxr_") and len(key) >= 40
        assert created["tenant"] == "acme" and created["source"] == "api"
        assert created["masked"] == key[:8] + "…"
        assert (await client.post("/chat", json=HELLO, headers=bearer(key))).status_code == 200
        assert (
            await client.post("/chat", json=HELLO, headers={"X-API-Key": key})
        ).status_code == 200

        listed = (await client.get("/admin/keys", headers=AUTH)).json()["keys"]
        assert [(k["id"], k["source"]) for k in listed] == [
            (ENV_ID, "environment"),
            (created["id"], "api"),
        ]
        environment, api = listed
        assert environment["tenant"] == "beta" and environment["scopes"] == ["llm.gateway:invoke"]
        assert environment["session_tokens"] == 900 and environment["masked"] is None
        assert api["name"] == "billing bot" and api["session_tokens"] == 4000
        assert api["created_at"] and "key" not in api
        assert key not in str(listed) and hashlib.sha256(key.encode()).hexdigest() not in str(
            listed
        )
    # stored as its digest only
    database = (tmp_path / DB_FILENAME).read_bytes()
    assert key.encode() not in database


async def test_a_key_calls_as_its_tenant_with_its_scopes_and_budget(app_client: Any) -> None:
    async with running(app_client) as client:
        reader = (await create(client, scopes=["llm.gateway:metrics:read"]))["key"]
        refused = await client.post("/chat", json=HELLO, headers=bearer(reader))
        assert refused.status_code == 403 and "llm.gateway:invoke" in refused.json()["detail"]
        status = await client.get("/budget/status", headers=bearer(reader))
        assert status.status_code == 200 and status.json()["tenant"] == "acme"

        tiny = (await create(client, session_tokens=5))["key"]
        over = await client.post("/chat", json=HELLO, headers=bearer(tiny))
        assert over.status_code == 429 and "budget" in over.text, over.text  # its own, 5 tokens
        roomy = (await create(client))["key"]
        assert (await client.post("/chat", json=HELLO, headers=bearer(roomy))).status_code == 200


async def test_rotate_issues_a_new_key_for_the_same_id_and_the_old_stops(app_client: Any) -> None:
    async with running(app_client) as client:
        created = await create(client, name="rotating", scopes=["llm.gateway:invoke"])
        rotated = await client.post(f"/admin/keys/{created['id']}/rotate", headers=AUTH)
        assert rotated.status_code == 200, rotated.text
        body = rotated.json()
        assert body["id"] == created["id"] and body["key"] != created["key"]
        assert body["scopes"] == ["llm.gateway:invoke"] and body["rotated_at"]
        old = await client.post("/chat", json=HELLO, headers=bearer(created["key"]))
        assert old.status_code == 401
        new = await client.post("/chat", json=HELLO, headers=bearer(body["key"]))
        assert new.status_code == 200


async def test_revoke_deletes_the_key_and_it_gets_401(app_client: Any) -> None:
    async with running(app_client) as client:
        created = await create(client)
        revoked = await client.delete(f"/admin/keys/{created['id']}", headers=AUTH)
        assert revoked.status_code == 200 and revoked.json()["id"] == created["id"]
        after = await client.post("/chat", json=HELLO, headers=bearer(created["key"]))
        assert after.status_code == 401
        listed = (await client.get("/admin/keys", headers=AUTH)).json()["keys"]
        assert created["id"] not in [k["id"] for k in listed]
        again = await client.delete(f"/admin/keys/{created['id']}", headers=AUTH)
        assert again.status_code == 404 and "GET /admin/keys" in again.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"tenant": "ac/me"}, "tenant", "not a tenant name"),
        ({"tenant": ""}, "tenant", "not a tenant name"),
        ({"tenant": "acme", "scopes": ["llm.gateway:invok"]}, "scopes", "unknown scope"),
        ({"tenant": "acme", "scopes": []}, "scopes", "empty scope list"),
        ({"tenant": "acme", "session_tokens": 0}, "session_tokens", "greater than or equal"),
        ({"tenant": "acme", "name": "x" * 65}, "name", "64 characters at most"),
        ({"tenant": "acme", "key": "cxr_mine"}, "key", "Extra inputs"),
        ({}, "tenant", "Field required"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    app_client: Any, body: dict[str, Any], field: str, words: str
) -> None:
    async with running(app_client) as client:
        response = await client.post("/admin/keys", json=body, headers=AUTH)
        assert response.status_code == 422
        problem = response.json()["detail"][0]
        assert problem["loc"][-1] == field and words in problem["msg"]
        assert (await client.get("/admin/keys", headers=AUTH)).json()["keys"][1:] == []


async def test_a_body_that_is_not_json_is_422(app_client: Any) -> None:
    async with running(app_client) as client:
        for content in (b"\xff\xfe{not json", b'{"tenant": "acme",'):
            response = await client.post("/admin/keys", content=content, headers=AUTH)
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["type"] in ("json_invalid", "value_error")


async def test_refusals_a_person_can_act_on(app_client: Any) -> None:
    async with running(app_client) as client:
        await create(client, name="taken")
        duplicate = await client.post(
            "/admin/keys", json={"tenant": "other", "name": "taken"}, headers=AUTH
        )
        assert duplicate.status_code == 409 and "'taken' exists" in duplicate.json()["detail"]
        for call in (client.delete, lambda url, **kw: client.post(f"{url}/rotate", **kw)):
            refused = await call(f"/admin/keys/{ENV_ID}", headers=AUTH)
            assert refused.status_code == 409
            assert "change CLIENT_API_KEYS" in refused.json()["detail"]
        assert (await client.post("/chat", json=HELLO, headers=bearer(ENV_KEY))).status_code == 200
        unknown = await client.post("/admin/keys/0badc0de/rotate", headers=AUTH)
        assert unknown.status_code == 404
        assert (await client.delete("/admin/keys/not-an-id", headers=AUTH)).status_code == 422


async def test_only_the_admin_token_manages_keys(app_client: Any) -> None:
    async with running(app_client) as client:
        key = (await create(client))["key"]
        for headers in ({}, bearer(key), bearer(ENV_KEY), bearer(TOKEN + "x")):
            assert (await client.get("/admin/keys", headers=headers)).status_code == 401
            response = await client.post("/admin/keys", json={"tenant": "a"}, headers=headers)
            assert response.status_code == 401
    async with app_client() as no_admin:  # no ADMIN_TOKEN: the admin API is off
        assert (await no_admin.get("/admin/keys", headers=AUTH)).status_code == 401


async def test_changes_are_audited_with_the_admin_and_never_the_key(
    app_client: Any, tmp_path: Path
) -> None:
    async with running(app_client) as client:
        created = await create(client, name="audited")
        rotated = (await client.post(f"/admin/keys/{created['id']}/rotate", headers=AUTH)).json()
        await client.delete(f"/admin/keys/{created['id']}", headers=AUTH)
        headers = {**AUTH, "X-Actor": "Dana"}
        await client.post("/admin/keys", json={"tenant": "zeta"}, headers=headers)
        records = (await client.get("/admin/audit", headers=AUTH)).json()["records"]
    actions = [(r["action"], r["actor"], r["result"]) for r in reversed(records)]
    admin = f"admin:{fingerprint(TOKEN)}"
    assert actions == [
        ("key_create", admin, "ok"),
        ("key_rotate", admin, "ok"),
        ("key_revoke", admin, "ok"),
        ("key_create", f"Dana ({admin})", "ok"),
    ]
    assert all(f"key {created['id']} tenant acme" in r["detail"] for r in records[1:])
    rows = sqlite3.connect(tmp_path / DB_FILENAME).execute("SELECT * FROM audit_log").fetchall()
    for secret in (created["key"], rotated["key"]):
        assert secret not in str(rows)
        assert hashlib.sha256(secret.encode()).hexdigest() not in str(rows)


# --- the admin token itself ----------------------------------------------------------------------


async def test_wrong_admin_tokens_are_throttled_per_address(app_client: Any) -> None:
    async with running(app_client, admin_max_failures_per_address=3) as client:
        for _ in range(5):  # right tokens are given back: never throttled
            assert (await client.get("/admin/keys", headers=AUTH)).status_code == 200
        wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
        statuses = [(await client.get("/admin/keys", headers=wrong)).status_code for _ in range(3)]
        assert statuses == [401, 401, 401]
        throttled = await client.post("/admin/keys", json={"tenant": "acme"}, headers=wrong)
        assert throttled.status_code == 429
        assert int(throttled.headers["Retry-After"]) >= 1
        assert "too many failed admin requests for this address" in throttled.json()["detail"]
        # the right token from this address waits too (counted before the check), nothing made
        assert (await client.get("/admin/keys", headers=AUTH)).status_code == 429
    async with running(app_client, admin_max_failures_per_address=None) as unlimited:
        wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
        for _ in range(15):
            assert (await unlimited.get("/admin/keys", headers=wrong)).status_code == 401


async def test_a_short_admin_token_is_warned_about_at_start_up(
    app_client: Any, captured: Captured
) -> None:
    async with app_client(admin_token=SecretStr("too-short")):
        pass
    async with app_client(admin_token=SecretStr(TOKEN)):
        pass
    warned = [line for line in captured.lines() if "ADMIN_TOKEN is" in line["message"]]
    assert len(warned) == 1 and warned[0]["level"] == "WARNING"
    assert "ADMIN_TOKEN is 9 characters" in warned[0]["message"]
    assert "too-short" not in captured.text


async def test_with_the_redis_store_keys_live_in_redis_as_digests(app_client: Any) -> None:
    async with redis_prefix() as prefix:
        settings = {"store_backend": "redis", "redis_url": REDIS_URL, "redis_key_prefix": prefix}
        async with running(app_client, **settings) as client:
            created = await create(client, name="replicated")
            assert (
                await client.post("/chat", json=HELLO, headers=bearer(created["key"]))
            ).status_code == 200
            redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
            try:
                names = [name async for name in redis.scan_iter(match=f"{prefix}{{client_keys}}*")]
                digest = hashlib.sha256(created["key"].encode()).hexdigest()
                assert f"{prefix}{{client_keys}}:digest:{digest}" in names
                values = [await redis.get(n) for n in names if await redis.type(n) == "string"]
                assert created["key"] not in str(values)
            finally:
                await redis.aclose()
            await client.delete(f"/admin/keys/{created['id']}", headers=AUTH)
            refused = await client.post("/chat", json=HELLO, headers=bearer(created["key"]))
            assert refused.status_code == 401
