"""A simulated NICE CXone: token endpoint, tenant discovery and the Digital Engagement messages API.

It checks credentials the way CXone does (HTTP Basic client credentials plus the access-key
password grant, or client credentials), issues JWT-shaped tokens carrying `tenantId`, refuses
revoked tokens with 401, and pages messages newest first with `scrollToken`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from app.simulator.faults import Fault, FaultPlan

SIM_TENANT_ID = "11eb0000-0000-0000-0000-00000000cafe"

_DEFAULT_HISTORY = [
    ("inbound", "Hi, I have a question about my account."),
    ("outbound", "Hello! I'm the virtual assistant. How can I help you today?"),
    ("inbound", "Something on my latest bill looks wrong."),
    ("outbound", "I'm sorry to hear that. Could you tell me more?"),
]


@dataclass
class CXoneSimulatorState:
    client_id: str = "sim-client"
    client_secret: str = "sim-client-secret"
    access_key_id: str = "sim-access-key"
    access_key_secret: str = "sim-access-secret"
    tenant_id: str = SIM_TENANT_ID
    expires_in: int = 3600
    token_delay: float = 0.0
    conversations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    token_faults: FaultPlan = field(default_factory=FaultPlan)
    message_faults: FaultPlan = field(default_factory=FaultPlan)
    issued: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    token_requests: int = 0
    discovery_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_conversation(self, contact_id: str, turns: list[tuple[str, str]]) -> None:
        """Store turns (direction, text), oldest first, as CXone message objects."""
        start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        self.conversations[contact_id] = [
            message(direction, text, start + timedelta(seconds=10 * i))
            for i, (direction, text) in enumerate(turns)
        ]

    def revoke_all(self) -> None:
        with self._lock:
            self.revoked |= self.issued

    def _issue(self) -> str:
        claims = {"tenantId": self.tenant_id, "jti": uuid.uuid4().hex, "iat": int(time.time())}
        token = (
            ".".join(
                base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
                for part in ({"alg": "none", "typ": "JWT"}, claims)
            )
            + ".sim"
        )
        with self._lock:
            self.token_requests += 1
            self.issued.add(token)
        return token

    def _valid(self, token: str) -> bool:
        with self._lock:
            return token in self.issued and token not in self.revoked


def message(direction: str, text: str, created: datetime) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "direction": direction,
        "messageContent": {"type": "TEXT", "payload": {"text": text}},
        "createdAt": created.isoformat().replace("+00:00", "Z"),
    }


async def _fault_response(fault: Fault | None) -> Response | None:
    """After the fault's delay, its error status or raw body; None to answer as usual."""
    if fault is None:
        return None
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.raw_body is not None:
        return Response(fault.raw_body, fault.status, fault.headers, "application/json")
    if fault.status < 400:
        return None
    return JSONResponse(
        fault.json_body or {"error": f"simulated {fault.status}"}, fault.status, fault.headers
    )


def create_cxone_simulator(state: CXoneSimulatorState | None = None) -> FastAPI:
    state = state or CXoneSimulatorState()
    app = FastAPI(title="cx-relay simulated CXone", openapi_url=None)
    app.state.cxone = state

    @app.post("/auth/token")
    async def token(request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        state.token_faults.record({"form": form, "headers": dict(request.headers)})
        if (scripted := await _fault_response(state.token_faults.next())) is not None:
            return scripted
        if state.token_delay:
            await asyncio.sleep(state.token_delay)
        expected = base64.b64encode(f"{state.client_id}:{state.client_secret}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            return JSONResponse({"error": "invalid_client"}, 401)
        grant = form.get("grant_type")
        if grant == "password":
            if (form.get("username"), form.get("password")) != (
                state.access_key_id,
                state.access_key_secret,
            ):
                return JSONResponse({"error": "invalid_grant"}, 400)
        elif grant != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        return JSONResponse(
            {
                "access_token": state._issue(),
                "token_type": "Bearer",
                "expires_in": state.expires_in,
                "refresh_token": uuid.uuid4().hex,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            }
        )

    @app.get("/.well-known/cxone-configuration")
    async def discovery(request: Request, tenantId: str = "") -> Response:
        state.discovery_requests += 1
        if tenantId != state.tenant_id:
            return JSONResponse({"error": "unknown tenant"}, 404)
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {
                "private": False,
                "area": "na1",
                "cluster": "SIM1",
                "domain": "simulated.local",
                "tenantId": state.tenant_id,
                "api_endpoint": base,
                "auth_endpoint": base,
                "ui_endpoint": base,
            }
        )

    @app.get("/dfo/3.0/contacts/{contact_id}/messages")
    async def messages(
        request: Request,
        contact_id: str,
        limit: int = 25,
        scrollToken: str = "",
        sortingType: str = "desc",
    ) -> Response:
        state.message_faults.record(
            {
                "contact_id": contact_id,
                "params": dict(request.query_params),
                "headers": dict(request.headers),
            }
        )
        if (scripted := await _fault_response(state.message_faults.next())) is not None:
            return scripted
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not state._valid(bearer):
            return JSONResponse({"error": "invalid_token"}, 401)
        history = state.conversations.get(contact_id)
        if history is None:
            start = datetime.now(UTC) - timedelta(minutes=5)
            history = [
                message(d, t, start + timedelta(seconds=20 * i))
                for i, (d, t) in enumerate(_DEFAULT_HISTORY)
            ]
        ordered = list(reversed(history)) if sortingType == "desc" else list(history)
        offset = int(scrollToken) if scrollToken.isdigit() else 0
        page = ordered[offset : offset + max(1, min(limit, 100))]
        next_offset = offset + len(page)
        body: dict[str, Any] = {"messages": page}
        if next_offset < len(ordered):
            body["scrollToken"] = str(next_offset)
        return JSONResponse(body)

    return app
