"""A simulated LLM provider: the embedded default, the test fake, the bench upstream.

It speaks the real OpenAI `/v1/chat/completions` and Anthropic `/v1/messages` wire formats, both
driven by the same FaultPlan. Asked for JSON (`response_format: json_object`, or a system prompt
mentioning JSON on the Anthropic route) it answers a routing decision from keyword rules over the
customer's message, or, given a JSON Schema (OpenAI's `json_schema` response format, or a schema
in the system text), an object built from that schema (`schema_answers.py`; `strict: true` with
a schema outside strict mode's subset is refused with 400, as OpenAI does); otherwise a short
conversational reply. Everything it answers is marked as
simulated in the model name. A key starting with "revoked" is refused with 401 (chat completions
and `GET /v1/models`), as a provider refuses a revoked key, so key pools and probes can be
exercised.

Asked to stream (`"stream": true`) both routes answer `text/event-stream` the way the real APIs
do: OpenAI `data: {chat.completion.chunk}` events (a role chunk, the content word by word, a
finish chunk, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`), Anthropic
`message_start` / `content_block_delta` ... `message_stop`. `/v1/chat/completions/ws` speaks the
WebSocket protocol of `app.llm.websocket_provider` (it refuses the handshake with 401 for a
"revoked" key). The FaultPlan's streaming knobs slow the first token, pace the chunks, fix the
chunks or cut the stream without its end marker.

`POST /v1/embeddings` answers OpenAI's embeddings list: for each input (a text or token ids) a
deterministic unit vector seeded from it (the same input always gets the same vector; 1536
dimensions, text-embedding-3-small's, or `dimensions`, a shorter one being the longer one's
start renormalised, as OpenAI's are), as floats or base64 (`encoding_format`), with the usage.
It honours the FaultPlan like chat completions (status, delay, raw or JSON body, omit_usage).

Given a TokenIssuer, it also plays a provider behind OAuth2: `POST /oauth/token` answers the
client-credentials grant (client authenticated by HTTP Basic or by form fields), and every other
route then takes only a bearer token it issued, unexpired and not revoked (else 401).

This module speaks the OpenAI wire (HTTP and WebSocket) and builds the app serving both routes;
the Anthropic wire lives in `anthropic_sim.py`, and what both answer in `answers.py`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import random
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import HTTPConnection

from app.simulator import anthropic_sim
from app.simulator.answers import (
    SIMULATED_MODEL_SUFFIX,
    content_text,
    paced,
    stream_deltas,
    token_count,
)
from app.simulator.faults import Fault, FaultPlan, fault_response, recorded_json
from app.simulator.schema_answers import schema_in_text, strict_mode_problem
from app.simulator.tool_answers import SimulatedCall, simulated_answer, tool_call


def completion_body(
    model: str, content: str, prompt_text: str, call: SimulatedCall | None = None
) -> dict[str, Any]:
    prompt_tokens, completion_tokens = token_count(prompt_text), token_count(content)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if call is not None:
        completion_tokens = token_count(call.name + call.arguments)
        message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(call)]}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "stop" if call is None else "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


REVOKED_KEY_PREFIX = "revoked"


def _tool_call(call: SimulatedCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


async def openai_stream_frames(
    fault: Fault,
    model: str,
    content: str,
    prompt_text: str,
    include_usage: bool,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    call: SimulatedCall | None = None,
) -> AsyncIterator[str]:
    """The payloads of one streamed chat completion, SSE and WebSocket alike: chunk JSONs, then
    "[DONE]" — unless the fault cuts the stream, which then just stops."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body: dict[str, Any] = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return json.dumps(body)

    yield chunk({"role": "assistant", "content": ""})
    deltas = stream_deltas(fault, content) if call is None else []
    async for delta in paced(fault, deltas, pause):
        yield chunk({"content": delta})
    if call is not None:  # as OpenAI streams a call: id and name, then the arguments in pieces
        opening = {"index": 0, **_tool_call(call)}
        opening["function"] = {"name": call.name, "arguments": ""}
        yield chunk({"tool_calls": [opening]})
        half = len(call.arguments) // 2
        for piece in (call.arguments[:half], call.arguments[half:]):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        deltas = [call.name, call.arguments]
    if fault.cut_after is not None:
        return
    yield chunk({}, fault.finish_reason or ("stop" if call is None else "tool_calls"))
    if include_usage and not fault.omit_usage:
        prompt_tokens, completion_tokens = token_count(prompt_text), token_count("".join(deltas))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        yield json.dumps(
            {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    yield "[DONE]"


async def _openai_sse(frames: AsyncIterator[str]) -> AsyncIterator[str]:
    async for frame in frames:
        yield f"data: {frame}\n\n"


async def _pause_unless_gone(websocket: WebSocket, seconds: float) -> None:
    """Wait, but notice a client that goes away meanwhile (WebSocketDisconnect), as a real
    server would, instead of sleeping through it."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(websocket.receive(), remaining)
        except TimeoutError:
            return
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(int(message.get("code", 1000)))


def _openai_error(status: int) -> dict[str, Any]:
    return {"error": {"message": f"simulated {status}", "type": "simulated_error"}}


def _retry_after(headers: dict[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None


_KEY_REFUSAL = {
    "error": {
        "message": "Incorrect API key provided",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}


def _bearer(request: HTTPConnection) -> str:
    authorization = request.headers.get("authorization", "")
    return authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""


def _key_revoked(request: HTTPConnection) -> bool:
    """A bearer token or x-api-key starting with "revoked" stands for a key the provider refuses."""
    presented = (_bearer(request), request.headers.get("x-api-key", ""))
    return any(key.startswith(REVOKED_KEY_PREFIX) for key in presented)


@dataclass
class TokenIssuer:
    """The simulated provider's OAuth2 authorization server. `plan` scripts the token endpoint's
    faults and records each token request (form fields and headers)."""

    client_id: str = "sim-llm-client"
    client_secret: str = "sim-llm-client-secret"
    expires_in: float = 3600.0
    plan: FaultPlan = field(default_factory=FaultPlan)
    issued: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def valid(self, token: str) -> bool:
        with self._lock:
            return time.monotonic() < self.issued.get(token, 0.0)

    def revoke_all(self) -> None:
        with self._lock:
            self.issued.clear()

    async def token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        self.plan.record({"form": form, "headers": dict(request.headers)})
        fault = self.plan.next() or Fault()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status >= 400:
            return JSONResponse(
                fault.json_body or {"error": "temporarily_unavailable"}, fault.status
            )
        basic = request.headers.get("authorization", "")
        if basic.lower().startswith("basic "):
            client_id, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if (client_id, secret) != (self.client_id, self.client_secret):
            return JSONResponse({"error": "invalid_client"}, 401)
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        value = f"sim-at-{uuid.uuid4().hex}"
        with self._lock:
            self.issued[value] = time.monotonic() + self.expires_in
        answer = {"access_token": value, "token_type": "Bearer", "expires_in": self.expires_in}
        return JSONResponse(answer | ({"scope": form["scope"]} if "scope" in form else {}))


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a request asks the answer to match: OpenAI's json_schema response format,
    or (asked for a json_object) one written into a system message."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else None
    if response_format.get("type") == "json_object":
        system = [m for m in body.get("messages") or [] if m.get("role") == "system"]
        return schema_in_text("\n".join(str(m.get("content", "")) for m in system))
    return None


def _strict_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's 400 error for `strict: true` with a schema outside strict mode's subset."""
    response_format = body.get("response_format") or {}
    spec = response_format.get("json_schema") or {}
    if response_format.get("type") != "json_schema" or spec.get("strict") is not True:
        return None
    problem = strict_mode_problem(spec.get("schema") or {})
    if problem is None:
        return None
    message = f"Invalid schema for response_format '{spec.get('name')}': {problem}."
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": "response_format",
            "code": None,
        }
    }


def _openai_answer(
    body: dict[str, Any], fault: Fault
) -> tuple[str, str, str, SimulatedCall | None]:
    """(model, content, prompt text, tool call) of the answer to a chat completion request."""
    messages = body.get("messages") or []
    answered = bool(messages) and messages[-1].get("role") == "tool"
    wants_json = (body.get("response_format") or {}).get("type") in ("json_object", "json_schema")
    content, call = simulated_answer(
        fault,
        messages,
        schema=_response_schema(body),
        wants_json=wants_json,
        tool_result=content_text(messages[-1].get("content")) if answered else None,
        call_for=lambda customer: tool_call(
            _openai_tools(body), _openai_choice(body), False, customer
        ),
    )
    model = str(body.get("model", "model")) + SIMULATED_MODEL_SUFFIX
    prompt_text = " ".join(content_text(m.get("content")) for m in messages)
    return model, content, prompt_text, call


def _openai_tools(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    functions = [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, dict)]
    return [(str(f.get("name")), f.get("parameters") or {}) for f in functions if f.get("name")]


def _openai_choice(body: dict[str, Any]) -> str | None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return str((choice.get("function") or {}).get("name"))
    return str(choice) if choice else None


EMBEDDING_DIMENSIONS = 1536  # text-embedding-3-small's
MAX_EMBEDDING_DIMENSIONS = 8192


def embedding_vector(item: str | list[int], dimensions: int) -> list[float]:
    """A unit vector that depends only on the input: seeded from its SHA-256."""
    rng = random.Random(hashlib.sha256(json.dumps(item).encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _embedding_inputs(value: Any) -> list[str | list[int]] | None:
    """The inputs of an embeddings request (None when it is not one of OpenAI's four shapes or
    an input is empty, which OpenAI refuses too)."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(type(x) is int for x in value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        return None
    if not items or not all(
        (isinstance(item, str) and item)
        or (isinstance(item, list) and item and all(type(x) is int for x in item))
        for item in items
    ):
        return None
    return items


def _embeddings_answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(status, body) for an embeddings request: the list, or OpenAI's 400 for a bad field."""
    items = _embedding_inputs(body.get("input"))
    dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS)
    encoding = body.get("encoding_format") or "float"
    if items is None:
        return _invalid("input", "'input' must be a non-empty string or array of non-empty inputs")
    if type(dimensions) is not int or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
        return _invalid("dimensions", f"'dimensions' must be from 1 to {MAX_EMBEDDING_DIMENSIONS}")
    if encoding not in ("float", "base64"):
        return _invalid("encoding_format", "'encoding_format' must be 'float' or 'base64'")
    data = []
    for index, item in enumerate(items):
        vector = embedding_vector(item, dimensions)
        encoded = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
            if encoding == "base64"
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(token_count(item) if isinstance(item, str) else len(item) for item in items)
    return 200, {
        "object": "list",
        "data": data,
        "model": str(body.get("model", "model")) + SIMULATED_MODEL_SUFFIX,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _invalid(param: str, message: str) -> tuple[int, dict[str, Any]]:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return 400, {"error": error}


def create_llm_simulator(
    plan: FaultPlan | None = None, oauth: TokenIssuer | None = None
) -> FastAPI:
    plan = plan or FaultPlan()
    app = FastAPI(title="cx-relay simulated LLM provider", openapi_url=None)
    app.state.plan = plan

    def refused(request: HTTPConnection) -> bool:
        """A revoked key, or (behind OAuth) a bearer token this provider did not issue or that
        expired."""
        return _key_revoked(request) or (oauth is not None and not oauth.valid(_bearer(request)))

    if oauth is not None:
        app.post("/oauth/token")(oauth.token)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await recorded_json(plan, request)
        if refused(request):  # refused before anything else: no fault is played
            return JSONResponse(_KEY_REFUSAL, 401)
        fault = plan.next() or Fault()
        if (scripted := await fault_response(fault, _openai_error)) is not None:
            return scripted
        if (refusal := _strict_refusal(body)) is not None:
            return JSONResponse(refusal, 400)
        model, content, prompt_text, call = _openai_answer(body, fault)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            frames = openai_stream_frames(
                fault, model, content, prompt_text, include_usage, call=call
            )
            return StreamingResponse(
                _openai_sse(frames), headers=fault.headers, media_type="text/event-stream"
            )
        whole = completion_body(model, content, prompt_text, call)
        if fault.omit_usage:
            del whole["usage"]
        if fault.finish_reason is not None:
            whole["choices"][0]["finish_reason"] = fault.finish_reason
        return JSONResponse(whole, headers=fault.headers)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await recorded_json(plan, request)
        if refused(request):
            return JSONResponse(_KEY_REFUSAL, 401)
        fault = plan.next() or Fault()
        if (scripted := await fault_response(fault, _openai_error)) is not None:
            return scripted
        status, answer = _embeddings_answer(body if isinstance(body, dict) else {})
        if fault.omit_usage:
            answer.pop("usage", None)
        return JSONResponse(answer, status, fault.headers)

    @app.websocket("/v1/chat/completions/ws")
    async def chat_completions_ws(websocket: WebSocket) -> None:
        """The chat completion stream over a WebSocket (see app.llm.websocket_provider)."""
        headers = dict(websocket.headers)
        if refused(websocket):
            await websocket.send_denial_response(JSONResponse(_KEY_REFUSAL, 401))
            return
        fault = plan.next() or Fault()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.reject_handshake and fault.status >= 400:
            plan.record({"body": None, "headers": headers})
            error = fault.json_body or _openai_error(fault.status)
            await websocket.send_denial_response(JSONResponse(error, fault.status, fault.headers))
            return
        await websocket.accept()
        completed = False
        try:
            body = json.loads(await websocket.receive_text())
            plan.record({"body": body, "headers": headers})
            if fault.raw_body is not None:
                await websocket.send_text(fault.raw_body)
            elif fault.json_body is not None or fault.status >= 400:
                error = fault.json_body or _openai_error(fault.status)
                if fault.json_body is None:
                    error["error"]["code"] = fault.status
                    if (retry_after := _retry_after(fault.headers)) is not None:
                        error["error"]["retry_after"] = retry_after
                await websocket.send_text(json.dumps(error))
            elif (refusal := _strict_refusal(body)) is not None:
                refusal["error"]["code"] = 400
                await websocket.send_text(json.dumps(refusal))
            else:
                model, content, prompt_text, call = _openai_answer(body, fault)
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                frames = openai_stream_frames(
                    fault,
                    model,
                    content,
                    prompt_text,
                    include_usage,
                    lambda seconds: _pause_unless_gone(websocket, seconds),
                    call=call,
                )
                async for frame in frames:
                    await websocket.send_text(frame)
                if fault.cut_after is not None:
                    await websocket.close(1011)  # gone mid-answer, without [DONE]
                    return
            completed = True
            await websocket.close(1000)
        except WebSocketDisconnect:
            if not completed:
                plan.note("ws-disconnect")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        if oauth is not None and refused(request):
            return JSONResponse(
                anthropic_sim.anthropic_error_body(401, "invalid bearer token"), 401
            )
        return await anthropic_sim.messages(plan, request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if refused(request):
            if "x-api-key" in request.headers:
                return JSONResponse(
                    anthropic_sim.anthropic_error_body(401, "invalid x-api-key"), 401
                )
            return JSONResponse(_KEY_REFUSAL, 401)
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    return app
