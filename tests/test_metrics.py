"""The router's metrics as an operator scraping /metrics sees them."""

from __future__ import annotations

import re

import httpx

from app.simulator.faults import Fault, FaultPlan
from tests.helpers import post_turn, trigger


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_attempt_outcomes_and_key_health_are_exported(
    client: httpx.AsyncClient, llm_plan: FaultPlan
) -> None:
    before = (await client.get("/metrics")).text
    llm_plan.push(Fault(status=503))
    await post_turn(client, trigger())
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    labels = {"provider": "default", "model": "gpt-4o-mini"}
    for outcome in ("unavailable", "ok"):
        delta = _value(after, "cxrelay_llm_attempts_total", outcome=outcome, **labels) - _value(
            before, "cxrelay_llm_attempts_total", outcome=outcome, **labels
        )
        assert delta == 1, outcome
    assert _value(after, "cxrelay_provider_keys_healthy", provider="default") == 1
    assert _value(after, "cxrelay_llm_retries_total", route="gpt-4o-mini") >= 1


async def test_no_secret_or_customer_text_in_metrics(client: httpx.AsyncClient) -> None:
    await post_turn(client, trigger(lastMessage="my card is 4111 1111 1111 1111"))
    text = (await client.get("/metrics")).text
    assert "4111 1111" not in text
    assert "sk-test-provider-key" not in text
    assert not re.search(r"session|conversation", text.split("# HELP")[0])
