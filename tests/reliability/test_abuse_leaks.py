"""Secrets and PII never leave the service by a side door: a scripted session sends requests that
carry the provider key, client keys, the admin token and customer text with an SSN, an email and a
card number, has the provider fail with error bodies that echo its key and the customer's text,
and then searches everything the service emitted — every log record (the project's JSON format,
root at DEBUG), /metrics, /health and /health/ready, and every error body (non-2xx answers, the
webhooks' fallback answers and streamed error events).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.observability.logs import JsonFormatter
from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import Fault, FaultPlan
from tests.helpers import API_KEY, CXONE_AUTH, SECRET, WEBHOOK, cxone_turn, post_turn, trigger

PROVIDER_KEY = "sk-test-provider-key"  # conftest's LLM_GATEWAY_API_KEY
BOT_STATE_SECRET = "test-bot-state-secret"  # conftest's BOT_STATE_SECRET
CLIENT_KEY = "leak-client-key-9a7d3e"
OTHER_CLIENT_KEY = "leak-client-key-b-41c2f0"
WRONG_KEY = "leak-wrong-key-77e1aa"
ADMIN_TOKEN = "leak-admin-token-2b8c64"
SSN = "536-22-1234"
EMAIL = "jane.roe@example.org"
CARD = "4111 1111 1111 1111"  # passes Luhn
PII_TEXT = f"I am {EMAIL}, SSN {SSN}, card {CARD}; charged twice"
CARD_DIGITS = re.compile(r"[^0-9A-Za-z]{0,6}".join("4111111111111111"))
SSN_DIGITS = re.compile(r"[^0-9]{0,6}".join("536221234"))
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# A careless upstream: its error quotes the key it was sent and the request it refused.
ECHO = (
    f"Incorrect API key provided: {PROVIDER_KEY} (Authorization: Bearer {PROVIDER_KEY}). {PII_TEXT}"
)
TEST_BASE_URL = "http://cx-relay.test"  # conftest's app_client
MODEL_PROBE = "model-named-by-a-caller-5d1e"


@pytest.fixture
def emitted() -> Iterator[io.StringIO]:
    """Every record every logger emits, through the service's own JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    # the test client's own lines name the test's requests, not what the service wrote
    handler.addFilter(lambda record: TEST_BASE_URL not in record.getMessage())
    root = logging.getLogger()
    loggers = [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    saved_root = root.level
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
        logger.disabled = False
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for logger, level, disabled in saved:
            logger.setLevel(level)
            logger.disabled = disabled


class Emissions:
    """What the service sent out, by channel."""

    def __init__(self) -> None:
        self.error_bodies: list[str] = []
        self.other: dict[str, str] = {}
        self.provider_saw_key = False

    def answer(self, response: httpx.Response, failed: bool | None = None) -> httpx.Response:
        if response.status_code >= 400 if failed is None else failed:
            self.error_bodies.append(
                f"{response.request.url.path} {response.status_code}: " + response.text
            )
        return response


def _fallback(response: httpx.Response) -> bool:
    """A webhook's 200 that reports a failure (Cognigy's route-to-human, CXone's fallback)."""
    body = response.json()
    return body.get("status", "success") != "success" or "errorDetails" in body


async def _drive(client: httpx.AsyncClient, llm_plan: FaultPlan, out: Emissions) -> None:
    chat = {"session_id": "leak-1", "messages": [{"role": "user", "content": PII_TEXT}]}
    openai = {"model": "gpt-4o-mini", "user": "leak-2", "messages": chat["messages"]}
    # served turns, every surface, the customer's PII in the text
    assert (await post_turn(client, trigger(lastMessage=PII_TEXT))).status_code == 200
    assert (await cxone_turn(client, user_input=PII_TEXT)).status_code == 200
    assert (await client.post("/chat", json=chat, headers=CLIENT)).status_code == 200
    streamed = {**chat, "session_id": "leak-3", "stream": True}
    assert (await client.post("/chat", json=streamed, headers=CLIENT)).status_code == 200
    pasted = f"my colleague's key is {PROVIDER_KEY}, is it valid? {PII_TEXT}"
    openai_pasted = {**openai, "messages": [{"role": "user", "content": pasted}]}
    assert (
        await client.post("/v1/chat/completions", json=openai_pasted, headers=CLIENT)
    ).status_code == 200

    out.provider_saw_key = any(
        PROVIDER_KEY in r["headers"].get("authorization", "") for r in llm_plan.requests
    )

    # credentials in the wrong place: the provider key as a client key, wrong keys, wrong token
    for wrong in (PROVIDER_KEY, WRONG_KEY, OTHER_CLIENT_KEY + "x"):
        bearer = {"Authorization": f"Bearer {wrong}"}
        out.answer(await client.post("/chat", json=chat, headers=bearer))
        out.answer(await client.post("/v1/chat/completions", json=openai, headers=bearer))
        out.answer(await client.get("/budget/status", headers=bearer))
        out.answer(await client.get("/admin/providers", headers=bearer))
        out.answer(
            await client.post(
                WEBHOOK, json=trigger(lastMessage=PII_TEXT), headers={"X-API-Key": wrong}
            )
        )
        out.answer(
            await client.post("/webhook/cxone", json={"userInput": PII_TEXT}, headers=bearer)
        )

    # malformed requests carrying PII: the 4xx names the field, not the value
    out.answer(await client.post("/chat", json={**chat, "surprise": PII_TEXT}, headers=CLIENT))
    out.answer(
        await client.post("/chat", json={**chat, "session_id": EMAIL + " x"}, headers=CLIENT)
    )
    out.answer(
        await client.post(
            "/v1/chat/completions", json={**openai, "n": 3, "user": EMAIL + " x"}, headers=CLIENT
        )
    )
    out.answer(await post_turn(client, trigger(lastMessage=PII_TEXT * 300)))  # over 8000 chars
    out.answer(await post_turn(client, trigger(confidenceScore=PII_TEXT)))
    out.answer(await cxone_turn(client, user_input=PII_TEXT, userInputType=PII_TEXT))
    # a model name is client input too: the 404 may name it back to its sender, but metrics
    # must not take it as a label value (the body is searched as a secret, below)
    for path, body in (("/v1/chat/completions", openai), ("/chat", chat)):
        unknown = await client.post(path, json={**body, "model": MODEL_PROBE}, headers=CLIENT)
        assert unknown.status_code == 404, unknown.text

    # the provider fails, echoing its key and the customer's text, in every way it can
    for status in (400, 401, 403, 404, 422, 429, 500, 503):
        llm_plan.push(*[Fault(status=status, json_body={"error": {"message": ECHO}})] * 12)
        session = f"leak-fail-{status}"
        text = f"{PII_TEXT} ({status})"  # its own text each time: no intent-cache answer
        failing = {"session_id": session, "messages": [{"role": "user", "content": text}]}
        out.answer(await client.post("/chat", json=failing, headers=CLIENT))
        out.answer(
            await client.post("/chat", json={**failing, "stream": True}, headers=CLIENT),
            failed=True,
        )
        oai = {**openai, "user": session, "messages": failing["messages"]}
        out.answer(await client.post("/v1/chat/completions", json=oai, headers=CLIENT))
        out.answer(
            await client.post("/v1/chat/completions", json={**oai, "stream": True}, headers=CLIENT),
            failed=True,
        )
        cognigy = await post_turn(client, trigger(conversationId=session, lastMessage=text))
        out.answer(cognigy, failed=_fallback(cognigy))
        cxone = await cxone_turn(client, user_input=text)
        out.answer(cxone, failed=_fallback(cxone))
        llm_plan.reset()
    llm_plan.push(*[Fault(status=500, raw_body=ECHO)] * 12)  # not even JSON
    out.answer(await client.post("/chat", json={**chat, "session_id": "leak-raw"}, headers=CLIENT))

    for path in ("/metrics", "/health", "/health/ready", "/health/live"):
        out.other[path] = (await client.get(path)).text
    out.other["/admin/providers"] = (await client.get("/admin/providers", headers=ADMIN)).text
    out.other["/admin/audit"] = (await client.get("/admin/audit", headers=ADMIN)).text


async def test_no_secret_and_no_pii_in_logs_metrics_health_or_error_bodies(
    app_client: Callable[..., Any],
    llm_plan: FaultPlan,
    cxone_state: CXoneSimulatorState,
    emitted: io.StringIO,
) -> None:
    out = Emissions()
    keys = [SecretStr(f"{CLIENT_KEY}:acme"), SecretStr(f"{OTHER_CLIENT_KEY}:beta")]
    async with app_client(client_api_keys=keys, admin_token=SecretStr(ADMIN_TOKEN)) as client:
        await _drive(client, llm_plan, out)

    # the run really handled all of it: the search below is not vacuous
    assert len(out.error_bodies) > 60
    assert out.provider_saw_key
    assert cxone_state.issued
    logs = emitted.getvalue()
    assert '"message": "request"' in logs and "cognigy turn" in logs

    secrets = [
        PROVIDER_KEY,
        CLIENT_KEY,
        OTHER_CLIENT_KEY,
        WRONG_KEY,
        ADMIN_TOKEN,
        SECRET,
        API_KEY,
        CXONE_AUTH.removeprefix("Bearer "),
        BOT_STATE_SECRET,
        cxone_state.client_secret,
        cxone_state.access_key_secret,
        *cxone_state.issued,
    ]
    channels = {
        "logs": logs,
        **out.other,
        **{f"error body {i}": body for i, body in enumerate(out.error_bodies)},
    }
    assert MODEL_PROBE not in out.other["/metrics"]
    for channel, text in channels.items():
        for value in secrets:
            assert value not in text, (
                f"a secret ({value[:6]}...) in {channel}: {_line(text, value)}"
            )
        for value in (EMAIL, EMAIL.replace("@", "%40")):
            assert value not in text, f"the email in {channel}: {_line(text, value)}"
        for name, pattern in (("SSN", SSN_DIGITS), ("card number", CARD_DIGITS)):
            found = pattern.search(text)
            assert found is None, f"the {name} in {channel}: {_line(text, found.group(0))}"


def _line(text: str, value: str) -> str:
    """The line (a log record, a body) where `value` was found."""
    return next((line for line in text.splitlines() if value in line), text)[:600]


async def test_a_refused_key_is_never_echoed_in_the_401(app_client: Callable[..., Any]) -> None:
    """The 401 says what was wrong, never what was sent (the value may be another system's key)."""
    async with app_client(client_api_keys=[SecretStr(CLIENT_KEY)]) as client:
        answers = [
            await client.post(
                "/chat", json={}, headers={"Authorization": f"Bearer {PROVIDER_KEY}"}
            ),
            await client.get("/v1/models", headers={"X-API-Key": PROVIDER_KEY}),
            await client.post(WEBHOOK, json=trigger(), headers={"X-API-Key": PROVIDER_KEY}),
            await client.post(
                WEBHOOK, json=trigger(), headers={"X-Webhook-Signature": PROVIDER_KEY}
            ),
            await client.post("/webhook/cxone", json={}, headers={"Authorization": PROVIDER_KEY}),
        ]
    for answer in answers:
        assert answer.status_code == 401
        assert PROVIDER_KEY not in answer.text and "sk-test" not in json.dumps(dict(answer.headers))
