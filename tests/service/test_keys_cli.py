"""`python -m app keys create|list|rotate|revoke` (app.__main__.main, in this process): the same
steps as /admin/keys against the store the settings name, audited as `cli:<user>`, with only the
store's settings needed. (Against a running service with two workers: the slow test in
tests/surfaces/admin/test_keys_across_workers.py.)"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from app.__main__ import main
from app.auth.signatures import fingerprint
from app.store.audit import DB_FILENAME
from app.store.redis_store import RedisStore
from tests.store.test_store import REDIS_URL, redis_prefix


def keys(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["keys", *args])
    out, err = capsys.readouterr()
    return code, out, err


def listed(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    code, out, _ = keys(capsys, "list", "--json")
    assert code == 0
    result: list[dict[str, Any]] = json.loads(out)
    return result


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Only DATA_DIR: no provider, no webhook credential (the service would need them)."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    return tmp_path


def test_create_prints_the_key_once_and_list_shows_it_masked(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = keys(
        capsys,
        "create",
        "--tenant",
        "acme",
        "--name",
        "nightly job",
        "--scopes",
        "llm.gateway:invoke+llm.gateway:metrics:read",
        "--session-tokens",
        "2500",
    )
    assert code == 0, err
    key = out.strip()
    assert key.startswith("cxr_") and "not shown again" in err
    [view] = listed(capsys)
    assert view["source"] == "api" and view["tenant"] == "acme" and view["name"] == "nightly job"
    assert view["scopes"] == ["llm.gateway:invoke", "llm.gateway:metrics:read"]
    assert view["session_tokens"] == 2500 and view["masked"] == key[:8] + "…"
    _, table, _ = keys(capsys, "list")
    assert view["id"] in table and key not in table
    assert key.encode() not in (data_dir / DB_FILENAME).read_bytes()


def test_rotate_and_revoke_are_audited_as_the_cli_user(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = keys(capsys, "create", "--tenant", "acme", "--json")
    created = json.loads(out)
    code, out, _ = keys(capsys, "rotate", created["id"], "--json")
    rotated = json.loads(out)
    assert code == 0 and rotated["id"] == created["id"] and rotated["key"] != created["key"]
    code, out, _ = keys(capsys, "revoke", created["id"])
    assert code == 0 and out.startswith(f"revoked: {created['id']}")
    assert listed(capsys) == []
    rows = (
        sqlite3.connect(data_dir / DB_FILENAME)
        .execute("SELECT actor, action, detail FROM audit_log ORDER BY id")
        .fetchall()
    )
    actor = f"cli:{getpass.getuser()}"
    assert [(a, b) for a, b, _ in rows] == [
        (actor, "key_create"),
        (actor, "key_rotate"),
        (actor, "key_revoke"),
    ]
    assert all(f"key {created['id']} tenant acme" in detail for _, _, detail in rows)
    assert created["key"] not in str(rows) and rotated["key"] not in str(rows)


def test_refusals_exit_1_with_a_message(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIENT_API_KEYS", "env-key-for-cli-tests:beta")
    env_id = fingerprint("env-key-for-cli-tests")
    assert [v["source"] for v in listed(capsys)] == ["environment"]
    code, _, err = keys(capsys, "revoke", env_id)
    assert code == 1 and "change CLIENT_API_KEYS" in err
    code, _, err = keys(capsys, "rotate", "0badc0de")
    assert code == 1 and "no client key has id '0badc0de'" in err
    code, _, err = keys(capsys, "create", "--tenant", "no/such")
    assert code == 1 and "not a tenant name" in err
    code, _, err = keys(capsys, "create", "--tenant", "acme", "--scopes", "llm.gateway:invok")
    assert code == 1 and "unknown scope llm.gateway:invok" in err
    keys(capsys, "create", "--tenant", "acme", "--name", "once")
    code, _, err = keys(capsys, "create", "--tenant", "acme", "--name", "once")
    assert code == 1 and "'once' exists" in err


def test_an_unreachable_store_exits_3(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORE_BACKEND", "redis")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # the discard port: nothing listens
    code, _, err = keys(capsys, "list")
    assert code == 3 and "could not be reached" in err


def test_keys_made_with_redis_are_in_redis_for_every_replica(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def in_redis(prefix: str) -> list[str]:
        store = await RedisStore.open(REDIS_URL, prefix=prefix)
        try:
            return [k.digest for k in await store.client_key_registry().all()]
        finally:
            await store.close()

    async def scenario() -> None:
        async with redis_prefix() as prefix:
            monkeypatch.setenv("STORE_BACKEND", "redis")
            monkeypatch.setenv("REDIS_URL", REDIS_URL)
            monkeypatch.setenv("REDIS_KEY_PREFIX", prefix)
            code, out, err = await asyncio.to_thread(keys, capsys, "create", "--tenant", "acme")
            assert code == 0, err
            assert await in_redis(prefix) == [hashlib.sha256(out.strip().encode()).hexdigest()]

    asyncio.run(scenario())
