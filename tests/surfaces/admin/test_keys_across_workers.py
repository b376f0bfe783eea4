"""Issue 21's "done when" for client keys, against the service as users run it: `python -m app
serve --simulate` with WORKERS=2 sharing DATA_DIR, real HTTP, every request on a connection of
its own (so both workers take some; /health's `startup.pid` says which one answered). A key
created through /admin/keys (or `python -m app keys`) works on the next request on every worker;
once revoked, every worker answers 401 within a second; both changes are in the audit log. And
the official `openai` client calls /v1 with a created key."""

from __future__ import annotations

import getpass
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import running_service, service_env

pytestmark = pytest.mark.slow  # the service runs as a process

ADMIN = "admin-token-keys-across-workers-9d41"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
ENV = {"ADMIN_TOKEN": ADMIN, "WORKERS": "2"}
REVOKED_WITHIN_SECONDS = 1.0
MAX_CONNECTIONS = 400  # to see both workers answer (the kernel picks the worker per connection)


def one_request(url: str, key: str) -> tuple[int, int]:
    """(the worker's pid, the status of GET /v1/models with `key`), on a new connection."""
    with httpx.Client(base_url=url, timeout=10) as http:
        pid = int(http.get("/health").json()["startup"]["pid"])
        status = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
    return pid, status


def on_both_workers(url: str, key: str) -> dict[int, list[int]]:
    """Requests on new connections until each of the two workers has answered at least three;
    the statuses by worker."""
    statuses: dict[int, list[int]] = defaultdict(list)
    for _ in range(MAX_CONNECTIONS):
        pid, status = one_request(url, key)
        statuses[pid].append(status)
        if len(statuses) == 2 and min(len(s) for s in statuses.values()) >= 3:
            return dict(statuses)
    raise AssertionError(f"one worker answered every connection: {dict(statuses)}")


def poll_until(url: str, key: str, deadline: float) -> None:
    """Requests on new connections until `deadline` (what a client sees meanwhile is not
    asserted: a worker may take up to CLIENT_KEYS_REFRESH_SECONDS to see the revocation)."""
    while time.monotonic() < deadline:
        one_request(url, key)


def audit(url: str) -> list[dict[str, str]]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
        records: list[dict[str, str]] = http.get("/admin/audit").json()["records"]
    return records


def test_a_created_key_works_on_every_worker_and_a_revoked_one_is_refused_within_a_second(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path, "--simulate", **ENV) as service:
        with httpx.Client(base_url=service.url, headers=AUTH, timeout=10) as admin:
            created = admin.post(
                "/admin/keys", json={"tenant": "acme", "scopes": ["llm.gateway:invoke"]}
            )
            assert created.status_code == 201, created.text
            key, key_id = created.json()["key"], created.json()["id"]
            statuses = on_both_workers(service.url, key)  # from the very next request on
            assert all(s == [200] * len(s) for s in statuses.values()), statuses

            client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=key, max_retries=0)
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Where is my parcel?"}]
            )
            assert answer.choices[0].message.content

            assert admin.delete(f"/admin/keys/{key_id}").status_code == 200
            poll_until(service.url, key, time.monotonic() + REVOKED_WITHIN_SECONDS)
        after = on_both_workers(service.url, key)  # every request from one second on: 401
        assert all(s == [401] * len(s) for s in after.values()), after
        with pytest.raises(openai.AuthenticationError):
            client.models.list()

        events = [(r["action"], r["detail"]) for r in audit(service.url)]
        assert ("key_revoke", f"key {key_id} tenant acme") in events
        assert ("key_create", f"key {key_id} tenant acme") in events


def test_a_key_made_with_the_cli_is_taken_up_by_the_running_service(tmp_path: Path) -> None:
    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "app", "keys", *args],
            cwd=tmp_path,
            env=service_env(DATA_DIR=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    with running_service(tmp_path, "--simulate", **ENV) as service:
        key = cli("create", "--tenant", "acme", "--name", "from the shell")
        statuses = on_both_workers(service.url, key)
        assert all(s == [200] * len(s) for s in statuses.values()), statuses
        key_id = next(line.split()[0] for line in cli("list").splitlines() if "from the" in line)
        cli("revoke", key_id)
        poll_until(service.url, key, time.monotonic() + REVOKED_WITHIN_SECONDS)
        after = on_both_workers(service.url, key)
        assert all(s == [401] * len(s) for s in after.values()), after
        actor = f"cli:{getpass.getuser()}"
        mine = [r["action"] for r in audit(service.url) if r["actor"] == actor]
        assert mine == ["key_revoke", "key_create"]
