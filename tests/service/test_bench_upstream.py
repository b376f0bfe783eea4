"""The benchmark's fake upstream (bench/fake_upstream.py) still speaks the wire the service reads.

Not the benchmark itself (that is `make bench`): one non-streamed completion, one stream and one
CXone messages page, parsed with the service's own schemas where it has them.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from app.llm.embeddings import (
    EmbeddingRequest,
    embeddings_payload,
    in_format,
    parse_embeddings,
)
from app.llm.openai_provider import parse_chunk, whole_tool_calls
from app.llm.streaming import ToolCallAssembly
from app.surfaces.cognigy.decision import RoutingDecision
from bench import fake_upstream


async def _exchange(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        return status, await reader.readexactly(length)
    finally:
        writer.close()


async def test_fake_upstream_answers_parse() -> None:
    server = await fake_upstream.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        status, body = await _exchange(
            port, "POST", "/v1/chat/completions", json.dumps(request).encode()
        )
        completion = json.loads(body)
        assert status == 200 and completion["object"] == "chat.completion"
        assert completion["choices"][0]["message"]["content"] == fake_upstream.REPLY
        assert completion["usage"]["total_tokens"] > 0

        routed = {**request, "response_format": {"type": "json_object"}}
        status, body = await _exchange(
            port, "POST", "/v1/chat/completions", json.dumps(routed).encode()
        )
        content = json.loads(body)["choices"][0]["message"]["content"]
        RoutingDecision.model_validate_json(content)

        streamed = json.dumps({**request, "stream": True}, separators=(",", ":")).encode()
        status, body = await _exchange(port, "POST", "/v1/chat/completions", streamed)
        events = [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == fake_upstream.REPLY
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0

        status, body = await _exchange(
            port, "GET", "/dfo/3.0/contacts/42/messages?sorting=createdAt&sortingType=desc"
        )
        messages = json.loads(body)["messages"]
        assert status == 200 and len(messages) == 4 and "scrollToken" not in json.loads(body)
        assert all(m["messageContent"]["payload"]["text"] for m in messages)
        assert messages[0]["createdAt"] > messages[-1]["createdAt"]  # newest first
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_fake_upstream_embeddings_parse(encoding: str) -> None:
    server = await fake_upstream.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        texts = ("one", "two", "three")
        request = EmbeddingRequest(fake_upstream.EMBEDDING_MODEL, texts, encoding_format=encoding)
        raw = json.dumps(embeddings_payload(request)).encode()
        status, body = await _exchange(port, "POST", "/v1/embeddings", raw)
    finally:
        server.close()
        await server.wait_closed()
    answer = parse_embeddings("bench", httpx.Response(status, content=body), request, 0.0)
    assert status == 200 and answer.usage_reported and answer.usage.prompt_tokens > 0
    assert [in_format(v, "float") for v in answer.vectors] == [fake_upstream.EMBEDDING] * 3


async def test_fake_upstream_tool_calls_parse_with_the_services_own_readers() -> None:
    """Offered tools, the fake calls one (whole and streamed, OpenAI's pieces); with the tool's
    result sent back, it answers in text."""
    server = await fake_upstream.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tool = {"type": "function", "function": {"name": "get_order_status", "parameters": {}}}
    asked = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    try:
        body = json.dumps({**asked, "tools": [tool]}).encode()
        _, whole = await _exchange(port, "POST", "/v1/chat/completions", body)
        message = json.loads(whole)["choices"][0]["message"]
        assert whole_tool_calls(message["tool_calls"]) == (fake_upstream.TOOL_CALL,)
        streamed = json.dumps({**asked, "tools": [tool], "stream": True}).encode()
        _, raw = await _exchange(port, "POST", "/v1/chat/completions", streamed)
        assembly = ToolCallAssembly()
        for event in raw.decode().split("\n\n"):
            payload = event.removeprefix("data: ")
            if payload and payload != "[DONE]":
                chunk = parse_chunk("fake", json.loads(payload), None)
                if chunk is not None:
                    assembly.add(chunk.tool_calls)
        assert assembly.whole() == (fake_upstream.TOOL_CALL,)
        result = {"role": "tool", "tool_call_id": fake_upstream.TOOL_CALL["id"], "content": "{}"}
        answered = {**asked, "tools": [tool], "messages": [*asked["messages"], result]}
        _, text = await _exchange(
            port, "POST", "/v1/chat/completions", json.dumps(answered).encode()
        )
        assert json.loads(text)["choices"][0]["message"]["content"] == fake_upstream.REPLY
    finally:
        server.close()
        await server.wait_closed()
