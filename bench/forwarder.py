"""A bare forwarder for the benchmark's ceiling rows: the stack cx-relay is built on (uvicorn,
FastAPI, an async HTTP client held by the lifespan) doing nothing but the service's upstream calls.

    python bench/forwarder.py --port P --upstream http://127.0.0.1:9100 --client aiohttp|httpx

`--client aiohttp`: one `aiohttp.ClientSession` (the stack's ceiling). `--client httpx`:
`httpx.AsyncClient` over httpx-aiohttp's transport with the service's pool limits and timeouts,
as app/upstream/http_client.py builds it for HTTP_TRANSPORT=aiohttp (its default). uvicorn runs
with the service's options (app/serving.py server_options): httptools, the default loop (uvloop
when installed), no log config, no access log; one process.

No auth, no validation, no parsing beyond what the calls need:

  POST /v1/chat/completions    the body posted upstream as is; the upstream's status, content type
                               and bytes answered (streamed through when it has "stream": true)
  POST /webhook/cognigy/fallback   the Cognigy path's calls: the CXone messages GET for the
                               conversation, then one non-streamed chat completion asking for JSON
  POST /webhook/cxone          the CXone path's calls: the messages GET for the contact, then a
                               streamed chat completion read to its end
  GET  /health                 {"status":"ok"}

The service caches its CXone token and API base URL, so neither is fetched per request here: the
messages GET carries a fixed bearer token.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

# the service's defaults (app/core/settings.py): LLM_TIMEOUT_SECONDS, HTTP_CONNECT_TIMEOUT_SECONDS,
# HTTP_MAX_CONNECTIONS, HTTP_MAX_KEEPALIVE_CONNECTIONS; keep-alive expiry from http_client.py
TIMEOUT, CONNECT_TIMEOUT, MAX_CONNECTIONS, MAX_KEEPALIVE, KEEPALIVE_EXPIRY = (
    5.0,
    2.0,
    200,
    100,
    30.0,
)
LLM_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench-upstream-key"}
CXONE_HEADERS = {"Accept": "application/json", "Authorization": "Bearer bench-cxone-access-token"}
HISTORY_PARAMS = {"sorting": "createdAt", "sortingType": "desc", "limit": 10}
MODEL = "gpt-4o-mini"


def is_stream(body: bytes) -> bool:
    return b'"stream":true' in body or b'"stream": true' in body


def chat_body(text: str, *, stream: bool, as_json: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a customer service assistant."},
            {"role": "user", "content": text},
        ],
    }
    if stream:
        body["stream"] = True
    if as_json:
        body["response_format"] = {"type": "json_object"}
    return json.dumps(body, separators=(",", ":")).encode()


class Upstream:
    """The calls the routes make, over either client."""

    async def post(self, url: str, body: bytes) -> tuple[int, str, bytes]:
        raise NotImplementedError

    async def post_stream(self, url: str, body: bytes) -> tuple[int, str, AsyncIterator[bytes]]:
        """Status, content type and the body's chunks; the iterator releases the response."""
        raise NotImplementedError

    async def get(self, url: str, params: dict[str, Any]) -> bytes:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class AiohttpUpstream(Upstream):
    def __init__(self) -> None:
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_EXPIRY)
        timeout = aiohttp.ClientTimeout(total=TIMEOUT, connect=CONNECT_TIMEOUT)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def post(self, url: str, body: bytes) -> tuple[int, str, bytes]:
        async with self.session.post(url, data=body, headers=LLM_HEADERS) as answer:
            content = await answer.read()
            return answer.status, answer.headers.get("Content-Type", "application/json"), content

    async def post_stream(self, url: str, body: bytes) -> tuple[int, str, AsyncIterator[bytes]]:
        answer = await self.session.post(url, data=body, headers=LLM_HEADERS)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.content.iter_any():
                    yield chunk
            finally:
                answer.release()

        return answer.status, answer.headers.get("Content-Type", "text/event-stream"), chunks()

    async def get(self, url: str, params: dict[str, Any]) -> bytes:
        async with self.session.get(url, params=params, headers=CXONE_HEADERS) as answer:
            return await answer.read()

    async def close(self) -> None:
        await self.session.close()


class HttpxUpstream(Upstream):
    """httpx is imported here, so that the aiohttp forwarder's memory holds none of it."""

    def __init__(self) -> None:
        import httpx
        from httpx_aiohttp import AiohttpTransport

        limits = httpx.Limits(
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_KEEPALIVE,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=limits,
            follow_redirects=False,
            transport=AiohttpTransport(limits=limits),
        )

    async def post(self, url: str, body: bytes) -> tuple[int, str, bytes]:
        answer = await self.client.post(url, content=body, headers=LLM_HEADERS)
        return (
            answer.status_code,
            answer.headers.get("content-type", "application/json"),
            (answer.content),
        )

    async def post_stream(self, url: str, body: bytes) -> tuple[int, str, AsyncIterator[bytes]]:
        request = self.client.build_request("POST", url, content=body, headers=LLM_HEADERS)
        answer = await self.client.send(request, stream=True)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            finally:
                await answer.aclose()

        return answer.status_code, answer.headers.get("content-type", "text/event-stream"), chunks()

    async def get(self, url: str, params: dict[str, Any]) -> bytes:
        answer = await self.client.get(url, params=params, headers=CXONE_HEADERS)
        return answer.content

    async def close(self) -> None:
        await self.client.aclose()


def create_app(upstream_url: str, client: str) -> FastAPI:
    base = upstream_url.rstrip("/")
    chat_url = f"{base}/v1/chat/completions"

    def messages_url(contact: str) -> str:
        return f"{base}/dfo/3.0/contacts/{contact}/messages"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.upstream = AiohttpUpstream() if client == "aiohttp" else HttpxUpstream()
        try:
            yield
        finally:
            await app.state.upstream.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        upstream: Upstream = request.app.state.upstream
        body = await request.body()
        if is_stream(body):
            status, content_type, chunks = await upstream.post_stream(chat_url, body)
            return StreamingResponse(
                chunks, status_code=status, headers={"content-type": content_type}
            )
        status, content_type, content = await upstream.post(chat_url, body)
        return Response(content, status_code=status, headers={"content-type": content_type})

    @app.post("/webhook/cognigy/fallback")
    async def cognigy(request: Request) -> Response:
        upstream: Upstream = request.app.state.upstream
        trigger = json.loads(await request.body())
        await upstream.get(messages_url(str(trigger["conversationId"])), HISTORY_PARAMS)
        body = chat_body(str(trigger.get("lastMessage", "")), stream=False, as_json=True)
        status, _, _ = await upstream.post(chat_url, body)
        return JSONResponse({"status": "success" if status == 200 else "error"})

    @app.post("/webhook/cxone")
    async def cxone(request: Request) -> Response:
        upstream: Upstream = request.app.state.upstream
        turn = json.loads(await request.body())
        contact = str(turn["executionInfo"]["contactId"])
        await upstream.get(messages_url(contact), HISTORY_PARAMS)
        body = chat_body(str(turn.get("userInput", "")), stream=True, as_json=False)
        status, _, chunks = await upstream.post_stream(chat_url, body)
        size = 0
        async for chunk in chunks:
            size += len(chunk)
        return JSONResponse(
            {
                "branchName": "PromptAndCollectNextResponse" if status == 200 else "Error",
                "bytes": size,
            }
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the fake upstream")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, args.client),
        host=args.host,
        port=args.port,
        http="httptools",
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
