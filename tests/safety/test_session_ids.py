"""Session ids that are personal data: an e-mail address as the OpenAI `user`, a card number as
`X-Session-Id`, and the like on /chat, /ws/chat and as Cognigy's conversationId. Each is stored,
logged and shown as a keyed digest (`pii-` + 32 hex digits), while the caller still reads its
session back by the id it sent; every other id is kept as it is."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import openai
import pytest
from pydantic import SecretStr, ValidationError
from starlette.testclient import TestClient

from app.bootstrap.credentials import session_id_key
from app.core.settings import DEV_BOT_STATE_SECRET as DEV_STATE
from app.core.settings import Settings
from app.main import create_app
from app.safety.rules import SafetyRules
from app.safety.session_ids import SessionIds
from app.store import NO_SESSION
from app.surfaces.openai.messages import valid_session_id
from tests.helpers import SECRET, TEST_BASE_URL, WEBHOOK, Captured, parts, signed, trigger

KEY = "ck-session-ids-7d41"
CLIENT = {"Authorization": f"Bearer {KEY}"}
EMAIL_USER = "jane.doe@example.com"  # /v1 `user`
CARD_SESSION = "4111-1111-1111-1111"  # /v1 X-Session-Id (passes Luhn)
CHAT_SESSION = "john.smith@example.org"  # /chat session_id
WS_SESSION = "212-555-0187"  # /ws/chat session_id (a North American phone number)
COGNIGY_CONVERSATION = "DE89370400440532013000"  # an IBAN as Cognigy's conversationId
PERSONAL = [EMAIL_USER, CARD_SESSION, CHAT_SESSION, WS_SESSION, COGNIGY_CONVERSATION]
DIGEST = re.compile(r"pii-[0-9a-f]{32}")


@pytest.fixture(scope="module")
def rules() -> SafetyRules:
    return SafetyRules.load()


def test_an_id_holding_personal_data_becomes_a_keyed_digest(rules: SafetyRules) -> None:
    ids, same_key, other_key = (SessionIds(rules, k) for k in (b"k1", b"k1", b"k2"))
    for raw in PERSONAL:
        stored = ids.stored(raw)
        assert DIGEST.fullmatch(stored), raw
        assert valid_session_id(stored)  # a caller may send it back as its session id
        assert same_key.stored(raw) == stored  # every worker and replica with the key agrees
        assert other_key.stored(raw) != stored  # not recomputable without the key
        assert ids.stored(stored) == stored  # a digest is no PII: mapping it again keeps it
    assert len({ids.stored(raw) for raw in PERSONAL}) == len(PERSONAL)
    # ids without personal data (a 16-digit order number failing Luhn, a CXone contact id) stay
    for kept in ["demo-1", "contact-42", "1234567890123456", "548712063", NO_SESSION]:
        assert ids.stored(kept) == kept


def _settings(**values: Any) -> Settings:
    base: dict[str, Any] = {
        "llm_gateway_base_url": "http://127.0.0.1:9",
        "cognigy_webhook_secret": [SecretStr("s")],
    }
    return Settings(_env_file=None, **{**base, **values})  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "several",
    [{"workers": 2}, {"store_backend": "redis", "redis_url": "redis://127.0.0.1:6379/0"}],
)
def test_several_workers_or_replicas_need_a_shared_key(several: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="SESSION_ID_SECRET is not set"):
        _settings(**several)
    for shared in ({"session_id_secret": "x" * 32}, {"bot_state_secret": "y" * 32}):
        _settings(**several, **shared)
    # simulated: derived from the development state secret, the same in every worker
    simulated = Settings(_env_file=None, simulate=True, **several)  # type: ignore[call-arg]
    assert session_id_key(simulated) == session_id_key(_settings(bot_state_secret=DEV_STATE))


def test_the_key_is_the_setting_else_derived_from_the_bot_state_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert session_id_key(_settings(session_id_secret="own-secret")) == b"own-secret"
    derived = session_id_key(_settings(bot_state_secret="state-secret"))
    assert derived == session_id_key(_settings(bot_state_secret="state-secret"))
    assert derived not in (b"state-secret", session_id_key(_settings(bot_state_secret="other")))
    with caplog.at_level(logging.WARNING, logger="cxrelay"):
        alone = session_id_key(_settings())  # one worker, SQLite: this process's own key
    assert alone != session_id_key(_settings()) and len(alone) == 32
    assert "SESSION_ID_SECRET is not set" in caplog.text


def test_personal_session_ids_never_reach_logs_ledger_or_budget(
    make_settings: Callable[..., Settings], captured: Captured, tmp_path: Path
) -> None:
    settings = make_settings(
        client_api_keys=[SecretStr(f"{KEY}:acme")],
        cognigy_webhook_secret=[SecretStr(f"{SECRET}:acme")],  # its turns in the same tenant
        llm_price_per_1k_prompt=0.5,
        llm_price_per_1k_completion=1.5,
        intent_cache_enabled=False,
        data_dir=tmp_path,
    )
    budget_reads: list[Any] = []
    with TestClient(create_app(settings), base_url=TEST_BASE_URL) as tc:
        stored = parts(tc.app).session_ids.stored
        client = openai.OpenAI(
            base_url=f"{TEST_BASE_URL}/v1", api_key=KEY, http_client=tc, max_retries=0
        )
        by_user = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], user=EMAIL_USER
        )
        for question in ("Where is my order?", "And when will it arrive?"):
            by_header = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": question}],
                extra_headers={"X-Session-Id": CARD_SESSION},
            )
        streamed = list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Hello there"}],
                user=EMAIL_USER,
                stream=True,
            )
        )
        chat = tc.post(
            "/chat",
            headers=CLIENT,
            json={"session_id": CHAT_SESSION, "messages": [{"role": "user", "content": "Hi"}]},
        )
        with tc.websocket_connect("/ws/chat", headers=CLIENT) as ws:
            ws.send_json(
                {"session_id": WS_SESSION, "messages": [{"role": "user", "content": "Hi"}]}
            )
            while (frame := ws.receive_json())["type"] == "content":
                pass
        # history is read from CXone's numeric contact (the conversation id would be sent to it)
        cxone_contact = {"channel": "chat", "cxoneContactId": "548712063"}
        raw, headers = signed(trigger(conversationId=COGNIGY_CONVERSATION, metadata=cxone_contact))
        cognigy = tc.post(WEBHOOK, content=raw, headers=headers)

        # the caller reads each session back by the id it sent
        for personal in PERSONAL:
            one = tc.get(f"/budget/sessions/{quote(personal)}", headers=CLIENT)
            assert one.status_code == 200, (personal, one.text)
            assert one.json()["session_id"] == stored(personal)
            usage = tc.get("/budget/usage", params={"session": personal}, headers=CLIENT)
            assert {r["session"] for r in usage.json()["records"]} == {stored(personal)}
            budget_reads += [one.json(), usage.json()]
        status = tc.get("/budget/status", headers=CLIENT).json()
        everything = tc.get("/budget/usage", params={"limit": 100}, headers=CLIENT).json()
        digests = {personal: stored(personal) for personal in PERSONAL}

    assert (by_user.model_extra or {})["cx_relay"]["session_id"] == digests[EMAIL_USER]
    assert (by_header.model_extra or {})["cx_relay"]["session_id"] == digests[CARD_SESSION]
    finish = [c for c in streamed if c.choices and c.choices[0].finish_reason]
    assert (finish[0].model_extra or {})["cx_relay"]["session_id"] == digests[EMAIL_USER]
    assert chat.status_code == 200 and chat.json()["session_id"] == digests[CHAT_SESSION]
    assert frame["type"] == "complete" and frame["session_id"] == digests[WS_SESSION]
    assert cognigy.status_code == 200 and cognigy.json()["status"] == "success"
    # one session per id, its calls together: the card's two calls, the e-mail's two
    calls = {s["session_id"]: s["calls"] for s in status["sessions"]}
    assert calls == {
        digests[EMAIL_USER]: 2,
        digests[CARD_SESSION]: 2,
        digests[CHAT_SESSION]: 1,
        digests[WS_SESSION]: 1,
        digests[COGNIGY_CONVERSATION]: 1,
    }
    assert {r["session"] for r in everything["records"]} == set(digests.values())

    # the raw ids appear nowhere: not in a log line, a /budget answer, or the store's files
    turns = [e for e in captured.lines() if e["message"].endswith(" turn")]
    assert {e["session_id"] for e in turns} == set(digests.values())
    assert any(e.get("path") == "/budget/sessions/{session_id}" for e in captured.lines())
    shown = json.dumps([budget_reads, status, everything])
    stored_files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert stored_files  # the SQLite ledger really is in this directory
    for personal in PERSONAL:
        for form in {personal, quote(personal, safe="")}:
            assert form not in captured.text, f"{form!r} was logged"
            assert form not in shown, f"{form!r} shown by /budget"
            assert form.encode() not in stored_files, f"{form!r} stored"
