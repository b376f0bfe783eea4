"""The traffic of the slow suites: one request of each surface, and what its caller saw.

Every request names the session its usage record will carry (`X-Session-Id` on
/v1/chat/completions, `conversationId` on Cognigy; CXone's comes back in `intentInfo.context`),
so the checks can find a request's record without a request id in the ledger.

`Outcome.answered` is the promise the ledger keeps: a 2xx carrying the model's answer (for a
stream, one that delivered its final `data: [DONE]` event). A webhook's fallback is a 2xx too,
but not an answer (`fallback`); a 429 is a budget refusal (`refused`); anything else, or a
connection that broke (the service was killed), is an `error`.

The client is bench/rawclient.py: tiny, keep-alive, so it costs little of the cores it shares
with the service.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import rawclient  # bench/ is not a package

from reliability.harness import CLIENT_KEY, COGNIGY_SECRET, CXONE_AUTH, HOST

SURFACES = ("chat", "stream", "cognigy", "cxone")
MAX_TOKENS = 256  # a reservation (prompt + 256) always covers the fake's usage (138 tokens)
TIMEOUT_SECONDS = 15.0
QUESTIONS = [
    "Where is my order {n}? It was supposed to arrive yesterday.",
    "I was charged twice for invoice {n}, can you check?",
    "How do I change the delivery address of order {n}?",
    "My card ending {n} was declined, why?",
]


@dataclass
class Outcome:
    surface: str
    session: str | None
    status: int | None  # None: no HTTP answer (connection refused or cut)
    answered: bool = False
    fallback: bool = False
    refused: bool = False
    cached: bool = False
    tokens: int | None = None  # the usage the answer reports
    latency_ms: float = 0.0
    started: float = 0.0  # time.monotonic()
    target: str = ""  # which service (replica) was asked
    error: str = ""
    reason: str = ""  # a fallback's or refusal's kind

    @property
    def failed(self) -> bool:
        """Neither answered, nor a documented fallback or refusal."""
        return not (self.answered or self.fallback or self.refused)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Pool:
    """Keep-alive connections to one service, handed out one request at a time."""

    def __init__(self, port: int, name: str = "") -> None:
        self.port = port
        self.name = name or str(port)
        self._idle: list[rawclient.Connection] = []
        self.opened = 0

    async def send(self, path: str, headers: dict[str, str], body: bytes) -> rawclient.Timing:
        conn = None
        while self._idle and conn is None:
            conn = self._idle.pop()  # the most recently used: the least likely to be timed out
            if conn.reader is None or conn.reader.at_eof():
                await conn.close()  # the server closed it (uvicorn's 5 s keep-alive timeout)
                conn = None
        if conn is None:
            conn = rawclient.Connection(HOST, self.port)
            self.opened += 1
        try:
            timing = await asyncio.wait_for(
                conn.request("POST", path, headers, body), TIMEOUT_SECONDS
            )
        except BaseException:
            await conn.close()
            raise
        if conn.writer is not None:
            self._idle.append(conn)
        return timing

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()


def question(key: str, n: int, repeat: bool = False) -> str:
    """A customer's question, unique to `key`; `repeat` picks one of a few fixed ones instead
    (the intent cache answers those after the first time)."""
    text = QUESTIONS[n % len(QUESTIONS)]
    return text.format(n=100 + n % 7 if repeat else key)


async def send(
    pool: Pool, surface: str, key: str, n: int, repeat: bool = False, session: str | None = None
) -> Outcome:
    """One request of `surface`; `key` makes its question, session and CXone contact unique;
    `session` puts it in that (shared) session instead (chat, stream and Cognigy)."""
    build = {"chat": _chat, "stream": _chat, "cognigy": _cognigy, "cxone": _cxone}[surface]
    path, headers, body, session = build(surface, key, n, repeat, session)
    outcome = Outcome(surface, session, None, started=time.monotonic(), target=pool.name)
    try:
        timing = await pool.send(path, headers, body)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        outcome.error = type(exc).__name__
        outcome.latency_ms = round((time.monotonic() - outcome.started) * 1000, 1)
        return outcome
    outcome.status = timing.status
    outcome.latency_ms = round(timing.ttlb * 1000, 1)
    try:
        _read(outcome, timing.body)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        outcome.answered = outcome.fallback = False
        outcome.error = f"unreadable answer: {exc}"
    return outcome


def _chat(
    surface: str, key: str, n: int, repeat: bool, shared: str | None
) -> tuple[str, dict[str, str], bytes, str | None]:
    session = shared or f"{key}-{surface}"
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": question(key, n, repeat)}],
        "max_tokens": MAX_TOKENS,
    }
    if surface == "stream":
        body.update(stream=True, stream_options={"include_usage": True})
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {CLIENT_KEY}",
        "X-Session-Id": session,
    }
    return "/v1/chat/completions", headers, json.dumps(body).encode(), session


def _cognigy(
    surface: str, key: str, n: int, repeat: bool, shared: str | None
) -> tuple[str, dict[str, str], bytes, str | None]:
    session = shared or f"{key}-cg"
    body = json.dumps(
        {
            "conversationId": session,
            "userId": f"u-{n}",
            "lastMessage": question(key, n, repeat),
            "confidenceScore": 0.42,
            "detectedIntent": "billing",
        },
        separators=(",", ":"),
    ).encode()
    signature = hmac.new(COGNIGY_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Webhook-Signature": f"sha256={signature}"}
    return "/webhook/cognigy/fallback", headers, body, session


def _cxone(
    surface: str, key: str, n: int, repeat: bool, shared: str | None
) -> tuple[str, dict[str, str], bytes, str | None]:
    contact = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)
    body = json.dumps(
        {
            "userInput": question(key, n, repeat),
            "userInputType": "TEXT",
            "executionInfo": {"contactId": contact},
            "mediaType": "chat",
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Authorization": CXONE_AUTH}
    return "/webhook/cxone", headers, body, None  # the session comes back in the answer


def _read(outcome: Outcome, body: bytes) -> None:
    status = outcome.status
    if status == 429:
        outcome.refused = True
        outcome.reason = "budget_exhausted"
        return
    if status is None or not 200 <= status < 300:
        outcome.error = f"HTTP {status}"
        return
    if outcome.surface == "chat":
        answer = json.loads(body)
        outcome.answered = bool(answer["choices"][0]["message"]["content"])
        outcome.tokens = int(answer["usage"]["total_tokens"])
        outcome.cached = bool(answer.get("cx_relay", {}).get("cached"))
    elif outcome.surface == "stream":
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        outcome.answered = bool(events) and events[-1] == "[DONE]"
        for event in events[:-1]:
            chunk = json.loads(event)
            if chunk.get("usage"):
                outcome.tokens = int(chunk["usage"]["total_tokens"])
            if chunk.get("cx_relay"):
                outcome.cached = bool(chunk["cx_relay"].get("cached"))
        if not outcome.answered:
            outcome.error = "stream without its final event"
    elif outcome.surface == "cognigy":
        answer = json.loads(body)
        outcome.answered = answer["status"] == "success"
        outcome.fallback = not outcome.answered
        outcome.reason = "" if outcome.answered else str(answer["status"])
        outcome.tokens = int(answer["usage"]["total_tokens"])
        outcome.cached = bool(answer.get("cached"))
    else:
        answer = json.loads(body)
        outcome.session = answer["intentInfo"]["context"]
        custom = answer.get("customPayload") or {}
        outcome.answered = answer["intentInfo"]["intent"] == "answered"
        outcome.fallback = not outcome.answered
        if outcome.fallback:
            why = custom.get("handoffReason") or (answer.get("errorDetails") or {}).get(
                "systemErrorMessage", ""
            )
            outcome.reason = f"{answer['intentInfo']['intent']}: {why}"[:80]
        outcome.cached = bool(custom.get("cached"))
        if "promptTokens" in custom:
            outcome.tokens = int(custom["promptTokens"]) + int(custom["completionTokens"])
