"""/budget/* as tenants and the operator see it: own tenant only, 404 for another's session."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.store import UsageRecord
from tests.helpers import parts

KEY_A, KEY_B, ADMIN = "key-tenant-a-123", "key-tenant-b-456", "admin-token-789"


def _record(tenant: str, session: str, cost: float) -> UsageRecord:
    return UsageRecord(
        tenant=tenant,
        session=session,
        surface="chat",
        provider="p",
        model="m",
        prompt_tokens=100,
        completion_tokens=20,
        cost=cost,
    )


@pytest.fixture
async def budget_client(app_client: Any, tmp_path: Any) -> Any:
    running = app_client(
        data_dir=tmp_path,
        client_api_keys=[SecretStr(f"{KEY_A}:acme"), SecretStr(f"{KEY_B}:globex")],
        admin_token=SecretStr(ADMIN),
    )
    async with running as client:
        store = parts(running.app).store
        for tenant, session, cost in [
            ("acme", "a-1", 0.5),
            ("acme", "a-2", 0.25),
            ("globex", "g-1", 1.0),
        ]:
            assert await store.append_usage(_record(tenant, session, cost))
        yield client


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_client_key_reads_its_own_tenant(budget_client: httpx.AsyncClient) -> None:
    body = (await budget_client.get("/budget/status", headers=_as(KEY_A))).json()
    assert body["tenant"] == "acme"
    assert body["total_cost"] == pytest.approx(0.75)
    assert body["session_costs"] == {"a-1": 0.5, "a-2": 0.25}
    assert "g-1" not in str(body)
    session = await budget_client.get("/budget/sessions/a-1", headers={"X-API-Key": KEY_A})
    assert session.status_code == 200
    assert (session.json()["calls"], session.json()["cost"]) == (1, 0.5)


async def test_another_tenants_session_is_404(budget_client: httpx.AsyncClient) -> None:
    response = await budget_client.get("/budget/sessions/g-1", headers=_as(KEY_A))
    assert response.status_code == 404
    unknown = await budget_client.get("/budget/sessions/nope", headers=_as(KEY_A))
    assert unknown.status_code == 404  # the same answer: ids cannot be probed
    assert (
        await budget_client.get("/budget/status?tenant=globex", headers=_as(KEY_A))
    ).status_code == 403


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}])
async def test_no_or_wrong_credential_is_401(
    budget_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for path in ("/budget/status", "/budget/sessions/a-1", "/budget/usage"):
        response = await budget_client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"


async def test_the_admin_token_sees_every_tenant(budget_client: httpx.AsyncClient) -> None:
    acme = (await budget_client.get("/budget/status?tenant=acme", headers=_as(ADMIN))).json()
    globex = (await budget_client.get("/budget/status?tenant=globex", headers=_as(ADMIN))).json()
    assert acme["total_cost"] == pytest.approx(0.75)
    assert globex["session_costs"] == {"g-1": 1.0}


async def test_usage_pages_newest_first(budget_client: httpx.AsyncClient) -> None:
    first = (await budget_client.get("/budget/usage?limit=1", headers=_as(KEY_A))).json()
    assert [r["session"] for r in first["records"]] == ["a-2"]
    second = (
        await budget_client.get(
            f"/budget/usage?limit=1&cursor={first['next_cursor']}", headers=_as(KEY_A)
        )
    ).json()
    assert [r["session"] for r in second["records"]] == ["a-1"]
    assert second["next_cursor"] is None
    only = (await budget_client.get("/budget/usage?session=a-1", headers=_as(KEY_A))).json()
    assert [r["session"] for r in only["records"]] == ["a-1"]
    bad = await budget_client.get("/budget/usage?cursor=garbage", headers=_as(KEY_A))
    assert bad.status_code == 400
    assert (await budget_client.get("/budget/usage?limit=0", headers=_as(KEY_A))).status_code == 422
