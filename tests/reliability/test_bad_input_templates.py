"""Template syntax in customer text reaches the model as the characters typed, on every surface
(Cognigy's message, intent and flow metadata, CXone's input, /chat and /v1 messages, the variables
of a caller's template), and a hostile caller template is refused in bounded time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import FaultPlan
from tests.helpers import WEBHOOK, cxone_turn, trigger
from tests.reliability.test_bad_input_bodies import CLIENT, KEYS, _assert_clear_4xx, _send

# --- template syntax in customer text -------------------------------------------------------------

PAYLOADS = [
    "{{ 7*7 }}",
    "{{ 7*'7' }}",
    "{% for i in range(3) %}X{% endfor %}",
    "{{ config }}",
    "{{ self.__init__.__globals__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% raw %}{{ 7*7 }}{% endraw %}",
    "{# hidden #}",
    "${7*7} #{7*7} <%= 7*7 %>",
]
CUSTOMER_TEXT = "Please help: " + " | ".join(PAYLOADS)
EVALUATED = ["49", "7777777", "XXX", "<class", "function", "uid="]


def _prompt(plan: FaultPlan, before: int) -> str:
    """Everything the provider was sent as message text by the one request after `before`."""
    assert len(plan.requests) == before + 1, "the turn did not reach the provider"
    return "\n".join(str(m.get("content")) for m in plan.requests[-1]["body"]["messages"])


def _assert_literal(prompt: str, text: str) -> None:
    assert text in prompt, "the customer's text did not reach the model as typed"
    for trace in EVALUATED:
        assert trace not in prompt, f"{trace!r} in the prompt: a template was evaluated"


async def test_template_syntax_in_customer_text_reaches_the_model_as_typed(
    app_client: Callable[..., Any], llm_plan: FaultPlan, cxone_state: CXoneSimulatorState
) -> None:
    """Each surface gets its own text, so none is answered from the intent cache."""
    async with app_client(**KEYS) as client:
        text = f"{CUSTOMER_TEXT} (cognigy)"
        cognigy = await _send(
            client, "POST", WEBHOOK, trigger(lastMessage=text, detectedIntent="{{ 7*7 }}")
        )
        assert cognigy.status_code == 200, cognigy.text
        prompt = _prompt(llm_plan, 0)
        _assert_literal(prompt, text)
        assert '"{{ 7*7 }}"' in prompt  # the NLU intent is data too

        text = f"{CUSTOMER_TEXT} (cxone)"
        cxone = await cxone_turn(client, user_input=text)
        assert cxone.status_code == 200, cxone.text
        _assert_literal(_prompt(llm_plan, 1), text)

        text = f"{CUSTOMER_TEXT} (chat)"
        chat = await client.post(
            "/chat",
            json={"session_id": "tpl-1", "messages": [{"role": "user", "content": text}]},
            headers=CLIENT,
        )
        assert chat.status_code == 200, chat.text
        _assert_literal(_prompt(llm_plan, 2), text)

        text = f"{CUSTOMER_TEXT} (openai)"
        openai = await client.post(
            "/v1/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "user": "tpl-2",
                "messages": [{"role": "user", "content": text}],
            },
            headers=CLIENT,
        )
        assert openai.status_code == 200, openai.text
        _assert_literal(_prompt(llm_plan, 3), text)

        # a caller's own template is rendered; the customer text in its variables is not
        text = f"{CUSTOMER_TEXT} (template)"
        templated = await client.post(
            "/chat",
            json={
                "session_id": "tpl-3",
                "template": "Customer wrote: {{ text }} (order {{ order }})",
                "variables": {"text": text, "order": "{{ 6*7 }}"},
            },
            headers=CLIENT,
        )
        assert templated.status_code == 200, templated.text
        prompt = _prompt(llm_plan, 4)
        _assert_literal(prompt, f"Customer wrote: {text}")
        assert "(order {{ 6*7 }})" in prompt and "42" not in prompt


async def test_template_syntax_in_flow_metadata_is_data_too(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    metadata = {"note": "{{ 7*7 }}", "{{ 8*8 }}": "{% for i in range(3) %}X{% endfor %}"}
    async with app_client(**KEYS) as client:
        response = await _send(client, "POST", WEBHOOK, trigger(metadata=metadata))
    assert response.status_code == 200, response.text
    prompt = _prompt(llm_plan, 0)
    assert "{{ 7*7 }}" in prompt and "{{ 8*8 }}" in prompt and "{% for i in range(3) %}" in prompt
    assert "49" not in prompt and "64" not in prompt and "XXX" not in prompt


HOSTILE_TEMPLATES = {
    "sandbox escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "os through globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "recursive macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "deep expression": "{{ " + "(" * 400 + "1" + ")" * 400 + " }}",
    "deep blocks": "{% if 1 %}" * 300 + "x" + "{% endif %}" * 300,
    "long attribute chain": "{{ v" + ".a" * 3000 + " }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "repetition": "{{ 'x' * 1000000000 }}",
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
async def test_a_hostile_caller_template_is_a_422_in_bounded_time(
    app_client: Callable[..., Any], llm_plan: FaultPlan, name: str
) -> None:
    """Rendering runs on the event loop: a template that recursed was a 500, and two nested
    ranges held the loop for minutes."""
    body = {"session_id": "hostile-1", "template": HOSTILE_TEMPLATES[name], "variables": {"v": {}}}
    async with app_client(**KEYS) as client:
        started = time.monotonic()
        response = await client.post("/chat", json=body, headers=CLIENT)
        elapsed = time.monotonic() - started
        alive = await client.get("/health/live")
    _assert_clear_4xx(response, 422)
    assert elapsed < 3.0, f"{elapsed:.1f}s to refuse the template"
    assert alive.status_code == 200
    assert llm_plan.requests == []
