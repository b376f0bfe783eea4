"""Every answered webhook turn leaves a usage record in the ledger; records survive a restart."""

from __future__ import annotations

from typing import Any

from app.simulator.faults import Fault, FaultPlan
from tests.helpers import cxone_turn, parts, post_turn, trigger


def _services(running: Any) -> Any:
    return parts(running.app)


async def test_cognigy_and_cxone_turns_are_recorded_and_survive_a_restart(
    app_client: Any, llm_plan: FaultPlan, tmp_path: Any
) -> None:
    first = app_client(data_dir=tmp_path)
    async with first as client:
        cognigy = (await post_turn(client, trigger(conversationId="conv-9"))).json()
        bot = (await cxone_turn(client, "hello")).json()
        services = _services(first)
        assert await services.ledger.flush(timeout=5)
        page = await services.store.list_usage("default")
    surfaces = {r.surface: r for r in page.records}
    assert set(surfaces) == {"cognigy", "cxone"}
    assert surfaces["cognigy"].session == "conv-9"
    assert surfaces["cognigy"].prompt_tokens == cognigy["usage"]["prompt_tokens"]
    assert surfaces["cxone"].session == bot["customPayload"]["sessionId"]
    assert surfaces["cxone"].completion_tokens == bot["customPayload"]["completionTokens"]

    second = app_client(data_dir=tmp_path)  # a new process on the same DATA_DIR
    async with second:
        again = await _services(second).store.list_usage("default")
    assert {r.id for r in again.records} == {r.id for r in page.records}


async def test_a_turn_that_reached_no_model_records_nothing(
    app_client: Any, llm_plan: FaultPlan, tmp_path: Any
) -> None:
    llm_plan.push(*[Fault(status=400)] * 2)
    running = app_client(data_dir=tmp_path)
    async with running as client:
        body = (await post_turn(client, trigger())).json()
        assert body["status"] == "llm_unavailable"
        await _services(running).ledger.flush(timeout=5)
        page = await _services(running).store.list_usage("default")
    assert page.records == []


async def test_cost_uses_the_provider_file_prices(
    app_client: Any, llm_server: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    import json

    monkeypatch.setenv("SIM_KEY", "sk-sim")
    path = tmp_path / "providers.json"
    path.write_text(
        json.dumps(
            {
                "providers": [
                    {
                        "name": "sim",
                        "base_url": llm_server.url,
                        "api_keys": ["env:SIM_KEY"],
                        "models": [
                            {
                                "name": "priced",
                                "price_per_1k_prompt": 1.0,
                                "price_per_1k_completion": 2.0,
                            }
                        ],
                    }
                ],
                "routes": [
                    {"name": "assistant", "chain": [{"provider": "sim", "model": "priced"}]}
                ],
            }
        )
    )
    running = app_client(data_dir=tmp_path, providers_file=path, llm_model="assistant")
    async with running as client:
        body = (await post_turn(client, trigger())).json()
        await _services(running).ledger.flush(timeout=5)
        record = (await _services(running).store.list_usage("default")).records[0]
    usage = body["usage"]
    expected = usage["prompt_tokens"] / 1000 * 1.0 + usage["completion_tokens"] / 1000 * 2.0
    assert abs(record.cost - expected) < 1e-6


async def test_every_answer_is_recorded_and_settled_before_it_is_returned(
    app_client: Any, llm_plan: FaultPlan, tmp_path: Any
) -> None:
    """No flush: when a caller holds its answer, the record is in the store and the session's
    budget counts exactly it (one atomic write before the answer; a crash can lose neither)."""
    from pydantic import SecretStr

    running = app_client(data_dir=tmp_path, client_api_keys=[SecretStr("ck-ledger:acme")])
    headers = {"Authorization": "Bearer ck-ledger"}
    question = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi there"}]}
    async with running as client:
        store = _services(running).store

        async def recorded(tenant: str, session: str) -> tuple[list[Any], int]:
            page = await store.list_usage(tenant, session)
            scope = _services(running).metering.budget.scopes_for(_principal(tenant), session)[0]
            return page.records, (await store.usage(scope)).used_tokens

        plain = await client.post(
            "/v1/chat/completions", json=question, headers={**headers, "X-Session-Id": "v1-a"}
        )
        records, used = await recorded("acme", "v1-a")
        assert [r.total_tokens for r in records] == [plain.json()["usage"]["total_tokens"]]
        assert used == records[0].total_tokens

        stream = await client.post(
            "/v1/chat/completions",
            json={**question, "stream": True, "messages": [{"role": "user", "content": "Yo"}]},
            headers={**headers, "X-Session-Id": "v1-b"},
        )
        assert stream.text.rstrip().endswith("data: [DONE]")
        records, used = await recorded("acme", "v1-b")
        assert len(records) == 1 and used == records[0].total_tokens > 0

        again = await client.post(  # the same question: an intent-cache hit, a zero-cost record
            "/v1/chat/completions", json=question, headers={**headers, "X-Session-Id": "v1-c"}
        )
        assert again.json()["cx_relay"]["cached"] is True
        records, used = await recorded("acme", "v1-c")
        assert [(r.cached, r.total_tokens) for r in records] == [(True, 0)] and used == 0

        cognigy = (await post_turn(client, trigger(conversationId="conv-now"))).json()
        records, used = await recorded("default", "conv-now")
        assert [r.total_tokens for r in records] == [cognigy["usage"]["total_tokens"]] == [used]

        bot = (await cxone_turn(client, "hello")).json()
        records, used = await recorded("default", bot["customPayload"]["sessionId"])
        assert len(records) == 1 and used == records[0].total_tokens > 0
        assert _services(running).ledger.pending == 0


def _principal(tenant: str) -> Any:
    from app.core.principal import Principal

    return Principal(tenant, "test", "client", "api_key")
