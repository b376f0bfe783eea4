"""Temperature per surface: the conversational surfaces (CXone bot turns, /chat) default to 0.7 as
the CXone tutorial, the Cognigy routing decision keeps ROUTING_TEMPERATURE (0.2), and a route in
the provider file overrides both — checked on what the provider actually received."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from app.simulator.faults import FaultPlan
from tests.helpers import cxone_turn, post_turn, trigger

KEY = "temperature-client-key"


def temperatures(plan: FaultPlan) -> list[float]:
    return [r["body"]["temperature"] for r in plan.requests if r["body"]]


async def every_surface(client: Any) -> None:
    chat = {"session_id": "t-1", "messages": [{"role": "user", "content": "Where is my order?"}]}
    response = await client.post("/chat", json=chat, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    assert (await cxone_turn(client)).status_code == 200
    assert (await post_turn(client, trigger())).status_code == 200


async def test_defaults_conversational_07_routing_02(app_client: Any, llm_plan: FaultPlan) -> None:
    async with app_client(client_api_keys=[SecretStr(KEY)]) as client:
        await every_surface(client)
    assert temperatures(llm_plan) == [0.7, 0.7, 0.2]  # /chat, CXone, Cognigy


async def test_settings_move_each_surface(app_client: Any, llm_plan: FaultPlan) -> None:
    settings = {"llm_temperature": 0.9, "routing_temperature": 0.0}
    async with app_client(client_api_keys=[SecretStr(KEY)], **settings) as client:
        await every_surface(client)
    assert temperatures(llm_plan) == [0.9, 0.9, 0.0]


async def test_a_route_temperature_overrides_both(
    app_client: Any, llm_plan: FaultPlan, llm_server: Any, tmp_path: Path
) -> None:
    raw = {
        "allow_literal_keys": True,
        "providers": [
            {
                "name": "sim",
                "base_url": llm_server.url,
                "api_keys": ["literal:sk-test-file-key"],
                "models": [{"name": "gpt-4o-mini"}],
            }
        ],
        "routes": [
            {
                "name": "steady",
                "temperature": 0.1,
                "chain": [{"provider": "sim", "model": "gpt-4o-mini"}],
            }
        ],
    }
    path = tmp_path / "providers.json"
    path.write_text(json.dumps(raw))
    overrides = {"providers_file": path, "llm_model": "steady"}
    async with app_client(client_api_keys=[SecretStr(KEY)], **overrides) as client:
        chat = {
            "session_id": "t-2",
            "model": "steady",
            "messages": [{"role": "user", "content": "Where is my order?"}],
        }
        headers = {"Authorization": f"Bearer {KEY}"}
        assert (await client.post("/chat", json=chat, headers=headers)).status_code == 200
        assert (await post_turn(client, trigger())).status_code == 200
    assert temperatures(llm_plan) == [0.1, 0.1]
