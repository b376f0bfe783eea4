"""POST /v1/embeddings as its users call it: the official `openai` client, unmodified, against the
app with its real lifespan and simulated providers on loopback (routing, keys, fallback, circuit,
budgets, ledger, metrics, refusals). Against `make run` itself: tests/service/test_examples.py."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.llm.tokens import text_tokens
from app.simulator.answers import token_count
from app.simulator.faults import Fault, FaultPlan
from app.simulator.llm import embedding_vector
from tests.helpers import parts
from tests.metric_samples import changes, labels, snapshot
from tests.surfaces.openai.test_openai_api import KEY, gateway

MODEL = "text-embedding-3-small"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIMULATED_PRICE = 0.00002  # USD per 1k input tokens, given as LLM_EMBEDDING_PRICE_PER_1K_INPUT


def float32(values: list[float]) -> list[float]:
    """What a vector becomes once sent as OpenAI's base64 (float32)."""
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def embeddings_requests(plan: FaultPlan) -> list[dict[str, Any]]:
    return [r["body"] for r in plan.requests if "input" in (r.get("body") or {})]


async def usage_records(raw: httpx.AsyncClient, app: Any) -> list[dict[str, Any]]:
    await parts(app).ledger.flush()
    response = await raw.get("/budget/usage", headers=AUTH)
    records: list[dict[str, Any]] = response.json()["records"]
    return records


# --- the answer ----------------------------------------------------------------------------------


async def test_a_string_comes_back_as_one_unit_vector_the_client_decoded_from_base64(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    text = "How do I reset my password?"
    price = {"llm_embedding_price_per_1k_input": SIMULATED_PRICE}
    async with gateway(app_client, **price) as (client, _, _):
        answer = await client.embeddings.create(model=MODEL, input=text)
    assert embeddings_requests(llm_plan)[-1]["encoding_format"] == "base64"  # the client's ask
    assert answer.object == "list" and answer.model == f"{MODEL}-simulated"
    (item,) = answer.data
    assert (item.object, item.index) == ("embedding", 0)
    assert len(item.embedding) == 1536
    assert item.embedding == float32(embedding_vector(text, 1536))
    assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-5)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == token_count(text)
    extras = (answer.model_extra or {})["cx_relay"]
    assert (extras["provider"], extras["model"], extras["session_id"]) == ("default", MODEL, None)
    assert extras["cost"] == pytest.approx(token_count(text) / 1000 * SIMULATED_PRICE)


async def test_a_list_in_float_with_dimensions_is_passed_on_and_answered_in_order(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    texts = ["Where is my order?", "Cancel my subscription", "Talk to a person"]
    async with gateway(app_client) as (client, _, _):
        answer = await client.embeddings.create(
            model=MODEL, input=texts, dimensions=64, encoding_format="float"
        )
    sent = embeddings_requests(llm_plan)[-1]
    assert (sent["input"], sent["dimensions"], sent["encoding_format"]) == (texts, 64, "float")
    assert [item.index for item in answer.data] == [0, 1, 2]
    assert [item.embedding for item in answer.data] == [embedding_vector(t, 64) for t in texts]


async def test_token_id_inputs_are_embedded_and_counted_by_their_length(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with gateway(app_client) as (client, raw, app):
        answer = await client.embeddings.create(model=MODEL, input=[[9906, 1917, 0], [15339, 11]])
        records = await usage_records(raw, app)
    assert embeddings_requests(llm_plan)[-1]["input"] == [[9906, 1917, 0], [15339, 11]]
    assert len(answer.data) == 2 and answer.usage.prompt_tokens == 5
    assert records[0]["prompt_tokens"] == 5 and records[0]["surface"] == "embeddings"


@pytest.mark.parametrize("asked", ["base64", "float"])
async def test_the_format_asked_for_is_answered_whatever_the_provider_sent(
    app_client: Callable[..., Any], llm_plan: FaultPlan, asked: str
) -> None:
    """A gateway that ignores `encoding_format`: floats become OpenAI's base64 (little-endian
    float32) for a caller that asked for base64, and base64 becomes floats for one that did not."""
    vector = [0.25, -0.5, 0.125, 1.0]
    sent: list[float] | str = vector
    if asked == "float":
        sent = base64.b64encode(struct.pack("<4f", *vector)).decode()
    provider = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": sent}],
        "model": MODEL,
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    llm_plan.push(Fault(json_body=provider))
    async with gateway(app_client) as (_, raw, _):
        body = {"model": MODEL, "input": "hello", "encoding_format": asked}
        response = await raw.post("/v1/embeddings", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    answered = response.json()["data"][0]["embedding"]
    if asked == "base64":
        assert list(struct.unpack("<4f", base64.b64decode(answered))) == vector
    else:
        assert answered == vector


async def test_a_provider_answer_without_one_vector_per_input_is_a_502(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    one = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}]}
    llm_plan.push(*[Fault(json_body=one)] * 3)
    async with gateway(app_client, llm_max_attempts=1) as (client, raw, app):
        with pytest.raises(openai.InternalServerError) as raised:
            await client.embeddings.create(model=MODEL, input=["one", "two"])
        records = await usage_records(raw, app)
    assert raised.value.status_code == 502 and records == []


# --- metering ------------------------------------------------------------------------------------


async def test_usage_is_in_the_session_budget_the_ledger_and_the_metrics(
    app_client: Callable[..., Any],
) -> None:
    texts = ["first document about refunds", "second document about deliveries"]
    tokens = sum(token_count(t) for t in texts)
    before = snapshot()
    price = {"llm_embedding_price_per_1k_input": 0.5}
    async with gateway(app_client, **price) as (client, raw, app):
        answer = await client.embeddings.create(
            model=MODEL, input=texts, extra_headers={"X-Session-Id": "kb-sync-1"}
        )
        records = await usage_records(raw, app)
        session = (await raw.get("/budget/sessions/kb-sync-1", headers=AUTH)).json()
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="no-such-model", input="x")
    cost = round(tokens / 1000 * 0.5, 8)
    assert answer.usage.prompt_tokens == tokens
    (record,) = records
    assert (record["surface"], record["session"], record["tenant"]) == (
        "embeddings",
        "kb-sync-1",
        "acme",
    )
    assert (record["provider"], record["model"]) == ("default", MODEL)
    assert (record["prompt_tokens"], record["completion_tokens"], record["cost"]) == (
        tokens,
        0,
        cost,
    )
    assert (session["cost"], session["total_tokens"], session["calls"]) == (cost, tokens, 1)
    moved = changes(before)
    metered = {"surface": "embeddings", "tenant": "acme", "provider": "default", "model": MODEL}
    assert moved["cxrelay_tokens_total"] == {labels(**metered, kind="prompt"): tokens}
    assert moved["cxrelay_cost_usd_total"] == {labels(**metered): cost}
    assert moved["cxrelay_requests_total"] == {
        labels(surface="embeddings", outcome="success", reason=""): 1,
        labels(surface="embeddings", outcome="rejected", reason="404"): 1,
    }


async def test_without_the_providers_usage_our_count_is_billed_and_marked_estimated(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    texts = ["hello world", "where is my order?"]
    llm_plan.push(Fault(omit_usage=True))
    async with gateway(app_client) as (client, raw, app):
        answer = await client.embeddings.create(model=MODEL, input=texts)
        records = await usage_records(raw, app)
    counted = sum(text_tokens(t, MODEL) for t in texts)  # text-embedding-3-small: cl100k_base
    assert answer.usage.prompt_tokens == counted == 2 + 5
    assert (answer.model_extra or {})["cx_relay"]["usage_estimated"] is True
    assert (records[0]["prompt_tokens"], records[0]["estimated"]) == (counted, True)


async def test_the_session_budget_refuses_what_it_cannot_hold_and_the_tenant_budget_too(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    text = "a paragraph of a knowledge base article " * 10  # ~80 tokens
    limits = {"budget_session_tokens": 20, "budget_tenant_day_tokens": 150}
    async with gateway(app_client, **limits) as (client, raw, app):
        with pytest.raises(openai.RateLimitError) as refused:
            await client.embeddings.create(model=MODEL, input=text, user="tight-session")
        calls_refused = len(embeddings_requests(llm_plan))
        without_session = await client.embeddings.create(model=MODEL, input=text)
        with pytest.raises(openai.RateLimitError) as over_the_day:
            await client.embeddings.create(model=MODEL, input=text)
        records = await usage_records(raw, app)
    assert refused.value.body["code"] == "budget_exhausted"  # type: ignore[index]
    assert refused.value.body["budget"]["scope"] == "session"  # type: ignore[index]
    assert calls_refused == 0  # refused before the provider heard of it
    assert without_session.usage.prompt_tokens > 20  # no session: only the tenant's limits
    assert over_the_day.value.body["budget"]["scope"] == "tenant_day"  # type: ignore[index]
    assert [r["session"] for r in records] == [None]


async def test_the_inbound_requests_and_tokens_per_minute_hold_embeddings_too(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    text = "a paragraph of a knowledge base article " * 10  # ~80 tokens
    async with gateway(app_client, client_rate_limit_rpm=1) as (client, _, _):
        await client.embeddings.create(model=MODEL, input="hello")
        with pytest.raises(openai.RateLimitError) as over_rpm:
            await client.embeddings.create(model=MODEL, input="hello again")
    async with gateway(app_client, client_rate_limit_tpm=50) as (client, _, _):
        with pytest.raises(openai.RateLimitError) as over_tpm:
            await client.embeddings.create(model=MODEL, input=text)
    assert over_rpm.value.body["limit"]["limit"] == "requests"  # type: ignore[index]
    assert int(over_rpm.value.response.headers["retry-after"]) >= 1
    assert over_tpm.value.body["limit"]["limit"] == "tokens"  # type: ignore[index]
    assert over_tpm.value.response.headers["x-should-retry"] == "false"  # it can never fit
    assert len(embeddings_requests(llm_plan)) == 1


# --- routing -------------------------------------------------------------------------------------


@asynccontextmanager
async def routed(
    app_client: Callable[..., Any],
    tmp_path: Path,
    providers: list[dict[str, Any]],
    routes: list[dict[str, Any]],
    **overrides: Any,
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient, Any]]:
    path = tmp_path / "providers.json"
    path.write_text(json.dumps({"providers": providers, "routes": routes}))
    async with gateway(app_client, providers_file=path, llm_model="gpt-4o-mini", **overrides) as (
        client,
        raw,
        app,
    ):
        yield client, raw, app


async def test_a_failing_primary_falls_back_and_its_open_circuit_is_then_skipped(
    app_client: Callable[..., Any],
    servers: tuple[str, str],
    plan_a: FaultPlan,
    plan_b: FaultPlan,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMB_GOOD", "sk-good")
    monkeypatch.setenv("EMB_REVOKED", "revoked-key-1")  # the simulator refuses it with 401
    providers = [
        {
            "name": "a",
            "base_url": servers[0],
            "api_keys": ["env:EMB_GOOD"],
            "models": [{"name": "gpt-4o-mini"}, {"name": MODEL, "kind": "embedding"}],
        },
        {
            "name": "b",
            "base_url": servers[1],
            "api_keys": ["env:EMB_REVOKED", "env:EMB_GOOD"],
            "models": [{"name": "text-embedding-3-large", "kind": "embedding"}],
        },
    ]
    chain = [
        {"provider": "a", "model": MODEL},
        {"provider": "b", "model": "text-embedding-3-large"},
    ]
    routes = [{"name": "search", "chain": chain}]
    plan_a.push(Fault(status=500))
    settings = {"circuit_failure_threshold": 1, "llm_max_attempts": 1}
    async with routed(app_client, tmp_path, providers, routes, **settings) as (client, raw, app):
        first = await client.embeddings.create(model="search", input="refund policy")
        second = await client.embeddings.create(model="search", input="delivery times")
        records = await usage_records(raw, app)
    assert len(embeddings_requests(plan_a)) == 1  # the second call skipped a: its circuit is open
    assert {r["model"] for r in embeddings_requests(plan_b)} == {"text-embedding-3-large"}
    keys = [r["headers"]["authorization"] for r in plan_b.requests]
    assert keys == ["Bearer revoked-key-1", "Bearer sk-good", "Bearer sk-good"]  # set aside once
    for answer in (first, second):
        extras = (answer.model_extra or {})["cx_relay"]
        assert (extras["provider"], extras["model"]) == ("b", "text-embedding-3-large")
    assert {(r["provider"], r["model"]) for r in records} == {("b", "text-embedding-3-large")}


async def test_embeddings_go_over_http_from_a_websocket_transport_provider(
    app_client: Callable[..., Any], llm_server: Any, llm_plan: FaultPlan, tmp_path: Path
) -> None:
    providers = [
        {
            "name": "wsgw",
            "base_url": llm_server.url,
            "transport": "websocket",
            "api_keys": ["literal:sk-ws"],
            "models": [{"name": "gpt-4o-mini"}, {"name": MODEL, "kind": "embedding"}],
        }
    ]
    path = tmp_path / "providers.json"
    path.write_text(json.dumps({"providers": providers, "allow_literal_keys": True}))
    async with gateway(app_client, providers_file=path) as (client, _, _):
        answer = await client.embeddings.create(model=MODEL, input="hello")
    assert len(answer.data[0].embedding) == 1536
    assert embeddings_requests(llm_plan)[-1]["model"] == MODEL


async def test_chat_and_embedding_models_are_not_interchangeable(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with gateway(app_client) as (client, _, _):
        with pytest.raises(openai.NotFoundError) as chat_model:
            await client.embeddings.create(model="gpt-4o-mini", input="hello")
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.embeddings.create(model="no-such-model", input="hello")
        with pytest.raises(openai.NotFoundError) as embedding_model:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}]
            )
    assert llm_plan.requests == []
    for raised, name in ((chat_model, "gpt-4o-mini"), (unknown, "no-such-model")):
        error = raised.value.body
        assert error["code"] == "model_not_found" and error["param"] == "model"  # type: ignore[index]
        assert name in error["message"]  # type: ignore[index]
    assert "is a chat model" in chat_model.value.body["message"]  # type: ignore[index]
    assert "is an embedding model" in embedding_model.value.body["message"]  # type: ignore[index]


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"input": ""}, "input", "must not be empty"),
        ({"input": []}, "input", "not empty"),
        ({"input": ["a question", ""]}, "input", "input[1] is empty"),
        ({"input": [[1, 2], []]}, "input", "input[1] is empty"),
        ({"input": [[1, -2]]}, "input", "input[0] must be token ids"),
        ({"input": ["x"] * 2049}, "input", "at most 2048 inputs"),
        ({"input": 42}, "input", "must be a string"),
        ({"input": "hi", "dimensions": 0}, "dimensions", ""),
        ({"input": "hi", "encoding_format": "hex"}, "encoding_format", ""),
        ({"input": "hi", "user": "not a session id!"}, "user", "session id"),
    ],
)
async def test_invalid_requests_are_400s_naming_the_field(
    app_client: Callable[..., Any],
    llm_plan: FaultPlan,
    fields: dict[str, Any],
    param: str,
    says: str,
) -> None:
    async with gateway(app_client) as (client, _, _):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.embeddings.create(model=MODEL, **fields)
    error = raised.value.body
    assert error["param"] == param and says in error["message"], error  # type: ignore[index]
    assert llm_plan.requests == []


async def test_an_input_longer_than_the_model_takes_is_a_400_before_any_call(
    app_client: Callable[..., Any], llm_server: Any, llm_plan: FaultPlan, tmp_path: Path
) -> None:
    providers = [
        {
            "name": "small",
            "base_url": llm_server.url,
            "api_keys": ["literal:sk-small"],
            "models": [
                {"name": "gpt-4o-mini"},
                {"name": "bge-small", "kind": "embedding", "max_context_tokens": 16},
            ],
        }
    ]
    path = tmp_path / "providers.json"
    path.write_text(json.dumps({"providers": providers, "allow_literal_keys": True}))
    async with gateway(app_client, providers_file=path) as (client, raw, app):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.embeddings.create(model="bge-small", input=["short", "long " * 40])
        records = await usage_records(raw, app)
        fits = await client.embeddings.create(model="bge-small", input=["short", "also short"])
    error = raised.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "input[1]"  # type: ignore[index]
    assert "at most 16" in error["message"]  # type: ignore[index]
    assert records == [] and len(embeddings_requests(llm_plan)) == 1
    assert len(fits.data) == 2


async def test_a_body_over_max_body_bytes_is_413(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    async with gateway(app_client, max_body_bytes=1024) as (client, _, _):
        with pytest.raises(openai.APIStatusError) as raised:
            await client.embeddings.create(model=MODEL, input="word " * 400)
    assert raised.value.status_code == 413
    assert raised.value.body["code"] == "request_too_large"  # type: ignore[index]
    assert llm_plan.requests == []


async def test_a_missing_key_is_401(app_client: Callable[..., Any]) -> None:
    async with gateway(app_client) as (_, raw, _):
        response = await raw.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
