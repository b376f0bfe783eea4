"""A fast fake upstream for the benchmark: an OpenAI-compatible provider plus CXone's token,
discovery and Digital Engagement messages endpoints, on one port.

Deliberately not FastAPI: a raw `asyncio.Protocol` HTTP/1.1 server with keep-alive that parses
the request line, the headers and a Content-Length body minimally and answers with canned bytes,
so that the benchmark measures cx-relay and not its fake. The wire shapes mirror
app/simulator/llm.py and app/simulator/cxone.py:

  POST /v1/chat/completions   chat.completion JSON; with `"stream": true` an SSE stream (a role
                              chunk, 5 content chunks, a finish chunk, a usage chunk, [DONE]);
                              with `response_format` a RoutingDecision JSON as the content;
                              offered `tools` (and no tool result yet), a tool call
  POST /v1/embeddings         an embeddings list: one fixed 8-dimension unit vector per input,
                              as floats or base64 (`encoding_format`)
  GET  /v1/models             a model list
  POST /auth/token            a JWT-shaped CXone access token carrying `tenantId`
  GET  /.well-known/cxone-configuration   discovery, `api_endpoint` pointing back here
  GET  /dfo/3.0/contacts/{id}/messages    4 text messages, newest first, no scrollToken

    python bench/fake_upstream.py --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import struct
import time
from typing import Any

MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
EMBEDDING = [0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]  # a unit vector
TENANT_ID = "11eb0000-0000-0000-0000-00000000cafe"
REPLY = "Sure, I can help with that. Your order is on its way and should arrive tomorrow."
ROUTING = {
    "classified_intent": "order_status",
    "confidence": 0.9,
    "extracted_parameters": {"order_number": "123456"},
    "suggested_response": "Let me check on your order. One moment please.",
    "requires_human_agent": False,
}
USAGE = {"prompt_tokens": 120, "completion_tokens": 18, "total_tokens": 138}
TOOL_CALL = {
    "id": "call_bench0000000000000000000",
    "type": "function",
    "function": {"name": "get_order_status", "arguments": '{"order_number":"123456"}'},
}
HISTORY = [  # oldest first; served newest first
    ("inbound", "Hi, I have a question about my account."),
    ("outbound", "Hello! I'm the virtual assistant. How can I help you today?"),
    ("inbound", "Something on my latest bill looks wrong."),
    ("outbound", "I'm sorry to hear that. Could you tell me more?"),
]

_MAX_HEAD = 64 * 1024


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def response(
    status: int, body: bytes, content_type: str = "application/json", extra: str = ""
) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
    head = (
        f"HTTP/1.1 {status} {reason.get(status, 'OK')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "\r\n"
    )
    return head.encode() + body


def completion(content: str, call: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if call is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return _dumps(
        {
            "id": "chatcmpl-bench000000000000000000",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "stop" if call is None else "tool_calls",
                }
            ],
            "usage": USAGE,
        }
    )


def sse_stream(content: str, parts: int = 5, call: dict[str, Any] | None = None) -> bytes:
    """A whole OpenAI SSE stream: role chunk, `parts` content chunks (or a tool call: its id and
    name, then its arguments in two pieces), finish, usage, [DONE]."""
    words = content.split(" ")
    size = max(1, -(-len(words) // parts))
    pieces = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    pieces = [p if i == 0 else " " + p for i, p in enumerate(pieces)]
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {
            "id": "chatcmpl-bench000000000000000000",
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": None,
        }
        return b"data: " + _dumps(body) + b"\n\n"

    frames = [chunk({"role": "assistant", "content": ""})]
    if call is None:
        frames += [chunk({"content": piece}) for piece in pieces]
    else:
        arguments = call["function"]["arguments"]
        opening = {**call, "index": 0, "function": {**call["function"], "arguments": ""}}
        frames.append(chunk({"tool_calls": [opening]}))
        for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
            frames.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    frames.append(chunk({}, "stop" if call is None else "tool_calls"))
    usage = {
        "id": "chatcmpl-bench000000000000000000",
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [],
        "usage": USAGE,
    }
    frames.append(b"data: " + _dumps(usage) + b"\n\n")
    frames.append(b"data: [DONE]\n\n")
    return b"".join(frames)


def embeddings(count: int, encoding: str) -> bytes:
    vector: list[float] | str = EMBEDDING
    if encoding == "base64":
        vector = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)]
    usage = {"prompt_tokens": 4 * count, "total_tokens": 4 * count}
    return _dumps({"object": "list", "data": data, "model": EMBEDDING_MODEL, "usage": usage})


def _inputs(body: bytes) -> tuple[int, str]:
    """(how many inputs, encoding_format) of an embeddings request."""
    try:
        request = json.loads(body)
        given = request["input"]
        encoding = str(request.get("encoding_format") or "float")
    except (ValueError, KeyError, TypeError):
        return 1, "float"
    if isinstance(given, str) or (isinstance(given, list) and given and isinstance(given[0], int)):
        return 1, encoding
    return (len(given) if isinstance(given, list) else 1), encoding


def _token() -> str:
    claims = {"tenantId": TENANT_ID, "jti": "bench", "iat": int(time.time())}
    parts = [{"alg": "none", "typ": "JWT"}, claims]
    encoded = [base64.urlsafe_b64encode(_dumps(p)).decode().rstrip("=") for p in parts]
    return ".".join(encoded) + ".sim"


def _messages() -> bytes:
    now = time.time()
    items = []
    for i, (direction, text) in enumerate(HISTORY):
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 300 + 20 * i))
        items.append(
            {
                "id": f"bench-msg-{i}",
                "direction": direction,
                "messageContent": {"type": "TEXT", "payload": {"text": text}},
                "createdAt": created,
            }
        )
    return _dumps({"messages": list(reversed(items))})


class Canned:
    """Every answer, built once."""

    def __init__(self) -> None:
        self.chat = response(200, completion(REPLY))
        self.chat_json = response(200, completion(json.dumps(ROUTING)))
        self.stream = response(
            200, sse_stream(REPLY), "text/event-stream", "Cache-Control: no-cache\r\n"
        )
        self.stream_json = response(
            200, sse_stream(json.dumps(ROUTING)), "text/event-stream", "Cache-Control: no-cache\r\n"
        )
        self.chat_tools = response(200, completion("", TOOL_CALL))
        self.stream_tools = response(
            200, sse_stream("", call=TOOL_CALL), "text/event-stream", "Cache-Control: no-cache\r\n"
        )
        self.models = response(
            200, _dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        )
        token = {
            "access_token": _token(),
            "token_type": "Bearer",
            "expires_in": 3600,
            "refresh_token": "bench-refresh",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        }
        self.token = response(200, _dumps(token))
        self.messages = response(200, _messages())
        self.not_found = response(404, b'{"error":"not found"}')
        self._embeddings: dict[tuple[int, str], bytes] = {}
        self.discovery: dict[bytes, bytes] = {}

    def embeddings_for(self, body: bytes) -> bytes:
        key = _inputs(body)
        cached = self._embeddings.get(key)
        if cached is None:
            cached = self._embeddings[key] = response(200, embeddings(*key))
        return cached

    def discovery_for(self, host: bytes) -> bytes:
        cached = self.discovery.get(host)
        if cached is None:
            base = "http://" + host.decode("latin-1")
            body = {
                "private": False,
                "area": "na1",
                "cluster": "BENCH",
                "domain": "bench.local",
                "tenantId": TENANT_ID,
                "api_endpoint": base,
                "auth_endpoint": base,
                "ui_endpoint": base,
            }
            cached = self.discovery[host] = response(200, _dumps(body))
        return cached


CANNED = Canned()
COUNTS: dict[str, int] = {}


def route(method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes) -> bytes:
    path = target.split(b"?", 1)[0]
    if path.endswith(b"/chat/completions") and method == b"POST":
        stream = b'"stream":true' in body or b'"stream": true' in body
        as_json = b"response_format" in body
        # offered tools and no tool result sent back yet: the model calls the tool
        calls = b'"tools"' in body and b'"tool_call_id"' not in body
        kind = "_tools" if calls else ("_json" if as_json else "")
        key = ("stream" if stream else "chat") + kind
        COUNTS[key] = COUNTS.get(key, 0) + 1
        return getattr(CANNED, key)  # type: ignore[no-any-return]
    if path.endswith(b"/embeddings") and method == b"POST":
        COUNTS["embeddings"] = COUNTS.get("embeddings", 0) + 1
        return CANNED.embeddings_for(body)
    if path.startswith(b"/dfo/3.0/contacts/") and path.endswith(b"/messages"):
        COUNTS["messages"] = COUNTS.get("messages", 0) + 1
        return CANNED.messages
    if path.endswith(b"/models"):
        return CANNED.models
    if path == b"/auth/token":
        COUNTS["token"] = COUNTS.get("token", 0) + 1
        return CANNED.token
    if path == b"/.well-known/cxone-configuration":
        return CANNED.discovery_for(headers.get(b"host", b"127.0.0.1"))
    if path == b"/health":
        return response(200, b'{"status":"ok"}')
    if path == b"/_counts":
        return response(200, _dumps(COUNTS))
    return CANNED.not_found


class HTTPProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; Content-Length bodies only (no chunked uploads)."""

    __slots__ = ("buffer", "transport")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out: list[bytes] = []
        close = False
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    close = True
                break
            head = bytes(self.buffer[:end]).split(b"\r\n")
            try:
                method, target, version = head[0].split(b" ", 2)
            except ValueError:
                out.append(
                    response(400, b'{"error":"bad request line"}', extra="Connection: close\r\n")
                )
                close = True
                break
            headers: dict[bytes, bytes] = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0") or 0)
            if len(self.buffer) < end + 4 + length:
                break  # the body is still arriving
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            out.append(route(method, target, headers, body))
            connection = headers.get(b"connection", b"").lower()
            if connection == b"close" or (version == b"HTTP/1.0" and connection != b"keep-alive"):
                close = True
                break
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if close and self.transport is not None:
            self.transport.close()


async def start(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start serving on the running loop; port 0 picks a free one (see server.sockets)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(HTTPProtocol, host, port, backlog=1024, reuse_address=True)


async def _main(host: str, port: int) -> None:
    server = await start(host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake upstream listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    asyncio.run(_main(args.host, args.port))


if __name__ == "__main__":
    main()
