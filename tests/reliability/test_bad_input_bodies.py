"""Hostile bodies on every route that reads one: oversized (413 before anything parses them, and
not read whole), nested a hundred thousand levels deep, not UTF-8, with huge `messages` arrays,
and identifiers that would bend an upstream URL. Whatever the body, the answer is a clear 4xx
(or the documented 200), never a 500. Template syntax: test_bad_input_templates.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.auth.signatures import sign_hmac
from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import FaultPlan
from tests.helpers import API_KEY, CXONE_AUTH, CXONE_WEBHOOK, SECRET, WEBHOOK, cxone_turn, trigger

CLIENT_KEY = "bad-input-client-key-5e2a"
ADMIN_TOKEN = "bad-input-admin-token-81fd"
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS: dict[str, Any] = {
    "client_api_keys": [SecretStr(f"{CLIENT_KEY}:acme")],
    "admin_token": SecretStr(ADMIN_TOKEN),
}
JSON = {"Content-Type": "application/json"}
YAML = {"Content-Type": "application/yaml"}


def _route_headers(path: str, body: bytes) -> dict[str, str]:
    """Valid credentials for each route; the Cognigy webhook's signature is over `body`."""
    if path == WEBHOOK:
        return {**JSON, "X-Webhook-Signature": sign_hmac(SECRET, body)}
    if path == CXONE_WEBHOOK:
        return {**JSON, "Authorization": CXONE_AUTH}
    if path.startswith("/admin"):
        return {**JSON, **ADMIN}
    return {**JSON, **CLIENT}


# Every route that reads a body, with the method it takes.
BODY_ROUTES = [
    ("POST", WEBHOOK),
    ("POST", CXONE_WEBHOOK),
    ("POST", "/chat"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/admin/config/validate"),
    ("PUT", "/admin/config"),
]


async def _send(
    client: httpx.AsyncClient, method: str, path: str, body: Any, **headers: str
) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.request(
        method, path, content=raw, headers={**_route_headers(path, raw), **headers}
    )


def _assert_clear_4xx(response: httpx.Response, *allowed: int) -> None:
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    body = response.json()  # a JSON explanation, in the route's own error shape
    assert body.get("detail") or body.get("error"), body
    assert "Traceback" not in response.text and "RecursionError" not in response.text


# --- size -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_a_body_over_the_limit_is_413_before_it_is_parsed(
    app_client: Callable[..., Any], llm_plan: FaultPlan, method: str, path: str
) -> None:
    limit = 4096
    async with app_client(**KEYS, max_body_bytes=limit) as client:
        over = await _send(client, method, path, b"{" + b"x" * limit)  # not JSON, one byte over
        at_limit = await _send(client, method, path, b"{" + b"x" * (limit - 1))
    assert over.status_code == 413, over.text
    assert str(limit) in over.text
    # exactly at the limit the body is read and parsed: refused as malformed, not as too big
    assert at_limit.status_code in (400, 422), at_limit.text
    assert llm_plan.requests == []


@pytest.mark.parametrize("path", [WEBHOOK, "/chat"])
async def test_a_streamed_body_over_the_limit_is_refused_without_being_read_whole(
    app_client: Callable[..., Any], llm_plan: FaultPlan, path: str
) -> None:
    """No Content-Length (chunked): the stream is counted and dropped at the limit."""
    limit, chunk, sent = 4096, 1024, []

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(10_000):  # 10 MB if it were all read
            sent.append(chunk)
            yield b"x" * chunk

    async with app_client(**KEYS, max_body_bytes=limit) as client:
        headers = {**JSON, "X-API-Key": API_KEY, **CLIENT}
        response = await client.post(path, content=endless(), headers=headers)
    assert response.status_code == 413, response.text
    assert len(sent) <= limit // chunk + 2, f"{len(sent)} chunks read for a {limit}-byte limit"
    assert llm_plan.requests == []


# --- nesting --------------------------------------------------------------------------------------

DEPTH = 100_000
DEEP_BODIES = {
    "arrays": b"[" * DEPTH + b"]" * DEPTH,
    "objects": b'{"a":' * 40_000 + b"1" + b"}" * 40_000,
    "in a field": b'{"conversationId": "c", "lastMessage": "hi", "session_id": "s", "metadata": '
    + b"[" * DEPTH
    + b"]" * DEPTH
    + b"}",
}


@pytest.mark.parametrize("shape", list(DEEP_BODIES))
async def test_json_nested_100k_deep_is_a_clear_4xx_on_every_route(
    app_client: Callable[..., Any],
    llm_plan: FaultPlan,
    caplog: pytest.LogCaptureFixture,
    shape: str,
) -> None:
    body = DEEP_BODIES[shape]
    async with app_client(**KEYS) as client:
        for method, path in BODY_ROUTES:
            response = await _send(client, method, path, body)
            _assert_clear_4xx(response, 400, 422)
            if path.startswith("/admin"):  # the admin API reads YAML too: nested the same way
                response = await _send(client, method, path, body, **YAML)
                _assert_clear_4xx(response, 422)
    assert llm_plan.requests == []
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_yaml_aliases_that_loop_or_explode_are_refused_at_once(
    app_client: Callable[..., Any],
) -> None:
    """A cycle cannot be serialised; nine lines of aliases expand to 10^9 values (the "billion
    laughs"), which took minutes of event-loop time to hash before they were refused."""
    laughs = b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
        b"%c: &%c [*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c]\n" % ((c, c) + (c - 1,) * 9)
        for c in range(ord("b"), ord("j"))
    )
    bodies = [b"providers: &p [*p]\n", b"&r {providers: *r}\n", laughs + b"providers: [*i]\n"]
    async with app_client(**KEYS) as client:
        for body in bodies:
            for method, path in BODY_ROUTES[-2:]:
                started = time.monotonic()
                response = await _send(client, method, path, body, **YAML)
                _assert_clear_4xx(response, 422)
                assert time.monotonic() - started < 2.0
        providers = await client.get("/admin/providers", headers=ADMIN)
    assert providers.json()["source"] != "applied"  # nothing changed


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


async def test_deep_but_parsable_values_go_through_every_surface(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    """Just under the JSON parser's depth limit the body is accepted: the pipeline (prompt
    rendering, the cache key, the caller's JSON Schema) must not recurse itself to death."""
    deep = _nested(190)
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(60):
        schema = {"type": "object", "properties": {"a": schema}}
    async with app_client(**KEYS) as client:
        cognigy = await _send(client, "POST", WEBHOOK, trigger(metadata={"deep": deep}))
        chat = await _send(
            client,
            "POST",
            "/chat",
            {"session_id": "deep-1", "template": "Look at {{ v }}", "variables": {"v": deep}},
        )
        schema_call = await _send(
            client,
            "POST",
            "/chat",
            {
                "session_id": "deep-2",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
            },
        )
        cxone = await cxone_turn(client, customPayload=deep, botConfig=deep)
    for response in (cognigy, chat, cxone):
        assert response.status_code == 200, response.text[:300]
    assert schema_call.status_code in (200, 422), schema_call.text[:300]
    assert len(llm_plan.requests) >= 3


# --- encoding -------------------------------------------------------------------------------------

NOT_UTF8 = {
    "bare bytes": b"\xff\xfe\xfd",
    "inside a string": b'{"conversationId": "c-\xff", "lastMessage": "caf\xe9", "session_id": "s"}',
    "lone surrogate": b'{"conversationId": "c", "lastMessage": "\\ud800", "session_id": "s"}',
    "overlong": b'{"lastMessage": "\xc0\xaf"}',
}


@pytest.mark.parametrize("shape", list(NOT_UTF8))
async def test_bodies_that_are_not_utf8_are_a_clear_4xx_on_every_route(
    app_client: Callable[..., Any], llm_plan: FaultPlan, shape: str
) -> None:
    body = NOT_UTF8[shape]
    async with app_client(**KEYS) as client:
        for method, path in BODY_ROUTES:
            for headers in [{}, YAML] if path.startswith("/admin") else [{}]:
                response = await _send(client, method, path, body, **headers)
                if response.status_code == 200 and path == "/admin/config/validate":
                    assert response.json()["valid"] is False  # the dry run lists the problems
                    continue
                _assert_clear_4xx(response, 400, 422)
                assert "\\xff" not in response.text  # the raw bytes are not echoed back
    assert llm_plan.requests == []


async def test_header_values_that_are_not_ascii_are_refused_or_cleaned(
    app_client: Callable[..., Any],
) -> None:
    raw = b"\xff\xfe caf\xc3\xa9 \x1b[31m"
    async with app_client(**KEYS) as client:
        session = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={**CLIENT, "X-Session-Id": raw},  # type: ignore[dict-item]
        )
        key = await client.post(
            "/chat",
            json={"session_id": "s", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": b"Bearer " + raw},  # type: ignore[dict-item]
        )
        actor = await client.post(
            "/admin/config/validate",
            content=b"providers: []",
            headers={**ADMIN, **YAML, "X-Actor": raw},  # type: ignore[dict-item]
        )
        request_id = await client.get("/health/live", headers={"X-Request-ID": raw})  # type: ignore[dict-item]
    assert session.status_code == 400 and session.json()["error"]["param"] == "X-Session-Id"
    assert key.status_code == 401
    assert actor.status_code == 200, actor.text
    assert request_id.status_code == 200
    assert request_id.headers["x-request-id"].isascii()
    assert raw.decode("latin-1") not in request_id.headers["x-request-id"]


# --- huge message arrays --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
async def test_huge_messages_arrays_are_refused_quickly_and_the_longest_allowed_one_is_served(
    app_client: Callable[..., Any], llm_plan: FaultPlan, path: str
) -> None:
    def body(count: int, session: str) -> dict[str, Any]:
        messages = [
            {"role": "user" if i % 2 else "assistant", "content": f"turn {i}"} for i in range(count)
        ]
        messages.append({"role": "user", "content": "and now?"})
        key = "session_id" if path == "/chat" else "user"
        return {key: session, "model": "gpt-4o-mini", "messages": messages}

    async with app_client(**KEYS, max_body_bytes=4 * 1024 * 1024) as client:
        started = time.monotonic()
        flood = await client.post(path, json=body(50_000, "flood-1"), headers=CLIENT)
        flood_seconds = time.monotonic() - started
        longest = await client.post(path, json=body(499, "longest-1"), headers=CLIENT)
    assert flood.status_code in (400, 422), flood.text[:300]
    assert "messages" in flood.text
    assert flood_seconds < 5.0
    assert len(llm_plan.requests) == 1  # only the allowed one reached the provider
    assert longest.status_code == 200, longest.text[:300]
    sent = llm_plan.requests[0]["body"]["messages"]
    assert sent[-1]["content"] == "and now?"  # history is fitted, the newest turn always kept


async def test_one_message_as_big_as_the_body_limit_is_a_clear_answer(
    app_client: Callable[..., Any], llm_plan: FaultPlan
) -> None:
    text = "word " * 50_000  # 250 KB: under the body limit, far over a context window
    async with app_client(**KEYS) as client:
        chat = await client.post(
            "/chat",
            json={"session_id": "big-1", "messages": [{"role": "user", "content": text}]},
            headers=CLIENT,
        )
        openai = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]},
            headers=CLIENT,
        )
    # served, too long for the context window, or over the session's token budget
    assert chat.status_code in (200, 400, 429), chat.text[:300]
    assert openai.status_code in (200, 400, 429), openai.text[:300]
    if chat.status_code != 200:
        assert chat.json()["error"] in ("context_length_exceeded", "budget_exhausted")
    if openai.status_code != 200:
        assert openai.json()["error"]["code"] in ("context_length_exceeded", "budget_exhausted")


# --- identifiers from the body in upstream URLs ---------------------------------------------


@pytest.mark.parametrize(
    "contact", ["a?b=1#c", "x\x1fy", "x/../../auth", "x\\..\\y", "%2e%2e", "é 1", ".."]
)
async def test_a_contact_id_from_the_trigger_stays_one_path_segment_of_the_cxone_call(
    app_client: Callable[..., Any], cxone_state: CXoneSimulatorState, contact: str
) -> None:
    """A flow names the CXone contact in `metadata`; it went into the history URL as it was:
    `?`/`#` cut the path (another resource was read), `..` climbed out of it and a control
    character made the request fail with a 500. Now it is one segment, or no request at all."""
    async with app_client() as client:
        body = trigger(metadata={"cxoneContactId": contact})
        response = await _send(client, "POST", WEBHOOK, body)
    assert response.status_code == 200, response.text
    read = [r["contact_id"] for r in cxone_state.message_faults.requests]
    if "/" in contact or "\\" in contact or contact == "..":  # names no contact: no history
        assert response.json()["context"] == "unavailable"
        assert read == []
    else:
        assert response.json()["context"] == "available"
        assert read == [contact]
