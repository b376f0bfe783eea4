"""/api/v1/llm-gateway: the Cognigy LLM-gateway tutorial's REST endpoints. Thin, as /admin is:
authenticate, parse the tutorial's payload, hand it to the one Provisioner, map its outcome.

- `GET /health`: a credential check. 200 with `X-Permissions` listing the key's scopes; 401 for
  a missing or unknown key.
- `POST /providers`: one provider added through the same validated, health-checked, persisted
  and audited apply as `PUT /admin/config` (Provisioner.add_provider); 201, 409 when the name
  exists, 422 with every problem and its path (the payload's names), 424 when the provider does
  not answer its health check with any of its keys.

The inference itself is POST /chat (the tutorial's camelCase payload) and the WebSocket
/ws/v1/llm-gateway/stream (the /ws/chat socket under the tutorial's path).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.core.principal import Principal
from app.deps import ProvisionerDep
from app.http.body import LimitedBodyDep
from app.http.caller import CallerDep
from app.http.openapi import HTTPError, error_response, json_request_body
from app.llm.catalog import Problem
from app.llm.notifications import public_url
from app.llm.provisioning import ApplyResult
from app.surfaces.gateway.schemas import (
    GatewayHealth,
    KeyOut,
    ProviderRegistration,
    RegisteredProvider,
    payload_path,
)

log = logging.getLogger("cxrelay.gateway")

PREFIX = "/api/v1/llm-gateway"
PERMISSIONS_HEADER = "X-Permissions"

router = APIRouter(prefix=PREFIX, tags=["llm-gateway"])


def scopes_of(principal: Principal) -> list[str]:
    """The scopes the credential carries (none yet: client keys have no scope list)."""
    return []


def actor_of(principal: Principal) -> str:
    """Who the audit log names: the credential's fingerprint, never the credential."""
    if principal.role == "admin":
        return f"admin:{principal.key_id}"
    return f"client:{principal.key_id} (tenant {principal.tenant})"


def _problems(status: int, detail: str, problems: list[Problem]) -> JSONResponse:
    body = {
        "detail": detail,
        "problems": [{"path": p.path, "message": p.message} for p in problems],
    }
    return JSONResponse(body, status_code=status)


def _payload_problems(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        problems.append(Problem(path or "(root)", item["msg"].removeprefix("Value error, ")))
    return problems


@router.get(
    "/health",
    response_model=GatewayHealth,
    responses={401: error_response("missing or unknown key", HTTPError)},
)
async def health(principal: CallerDep) -> JSONResponse:
    scopes = scopes_of(principal)
    body = GatewayHealth(
        tenant=principal.tenant, key_id=principal.key_id, role=principal.role, scopes=scopes
    )
    return JSONResponse(body.model_dump(), headers={PERMISSIONS_HEADER: ",".join(scopes)})


@router.post(
    "/providers",
    status_code=201,
    response_model=RegisteredProvider,
    responses={
        401: error_response("missing or unknown key", HTTPError),
        403: error_response("the credential may not change the configuration", HTTPError),
        409: {"description": "a provider of that name exists; nothing changed"},
        413: error_response("body over MAX_BODY_BYTES", HTTPError),
        422: {"description": "every problem of the payload, with its path; nothing changed"},
        424: {"description": "the provider failed its health check; nothing changed"},
    },
    openapi_extra=json_request_body(ProviderRegistration),
)
async def register_provider(
    principal: CallerDep, body: LimitedBodyDep, provisioner: ProvisionerDep
) -> Any:
    if principal.role != "admin":
        raise HTTPException(
            403, "registering a provider changes the configuration: send the admin token"
        )
    try:
        registration = ProviderRegistration.model_validate_json(body)
    except ValidationError as error:
        return _problems(422, "the provider registration is invalid", _payload_problems(error))
    result = await provisioner.add_provider(registration.provider_entry(), actor_of(principal))
    if result.ok:
        return _registered(registration, result)
    prefix = f"providers[{len(provisioner.slot.current.config.providers)}]"
    problems = [Problem(payload_path(p.path, prefix), p.message) for p in result.problems]
    if result.exists:
        return _problems(409, f"provider {registration.name!r} already exists", problems)
    if result.outcome == "invalid":
        return _problems(422, "the provider registration is invalid; nothing changed", problems)
    if result.outcome == "health_check_failed":
        return _problems(424, "provider health check failed; nothing changed", problems)
    return _problems(500, "the configuration change failed; nothing changed", problems)


def _registered(registration: ProviderRegistration, result: ApplyResult) -> RegisteredProvider:
    entry = registration.provider_entry()
    return RegisteredProvider(
        name=registration.name,
        type=registration.type,
        defaultModel=registration.defaultModel,
        baseUrl=public_url(entry["base_url"]),
        timeoutMs=registration.timeoutMs,
        rotationStrategy=registration.apiKeyRotation.rotationStrategy,
        retryOnRateLimit=registration.retryOnRateLimit,
        sha256=result.sha256,
        unhealthyKeys=[KeyOut(key_id=k.key_id, source=k.source) for k in result.unhealthy_keys],
    )
