"""/api/v1/llm-gateway: the Cognigy LLM-gateway tutorial's REST endpoints. Thin, as /admin is:
authenticate, parse the tutorial's payload, hand it to the one Provisioner, map its outcome.

- `GET /health`: a credential check. 200 with `X-Permissions` listing the key's scopes; 401 for
  a missing or unknown key, 403 for a scope list without llm-inference:read.
- `POST /providers`: one provider added through the same validated, health-checked, persisted
  and audited apply as `PUT /admin/config` (Provisioner.add_provider); 201, 409 when the name
  exists, 422 with every problem and its path (the payload's names), 424 when the provider does
  not answer its health check with any of its keys. The admin token, or llm-gateway:manage.

The inference itself is POST /chat (the tutorial's camelCase payload) and the WebSocket
/ws/v1/llm-gateway/stream (the /ws/chat socket under the tutorial's path).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.core.principal import Principal
from app.core.scopes import GATEWAY_MANAGE, INFERENCE_EXECUTE, INFERENCE_READ
from app.deps import ProvisionerDep
from app.http.body import LimitedBodyDep
from app.http.caller import audit_actor, require_scope
from app.http.openapi import HTTPError, error_response, json_request_body
from app.http.problems import problems_response
from app.llm.catalog import Problem, loc_path
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


# What a credential without a scope list may do on these endpoints, in the tutorial's names.
UNSCOPED_PERMISSIONS = (INFERENCE_EXECUTE, INFERENCE_READ)
ADMIN_PERMISSIONS = (INFERENCE_EXECUTE, INFERENCE_READ, GATEWAY_MANAGE)


def permissions(principal: Principal) -> list[str]:
    """X-Permissions: a scoped key's or token's own scope list; for a key without one, what
    it may do here (call models and read, not register providers); the admin token, all three."""
    if principal.role == "admin":
        return sorted(ADMIN_PERMISSIONS)
    if principal.scopes is None:
        return sorted(UNSCOPED_PERMISSIONS)
    return sorted(principal.scopes)


# Registering a provider changes what every tenant is served by: the admin token, or a credential
# whose scope list holds llm-gateway:manage (a key without a scope list does not pass).
ManagerDep = Annotated[Principal, Depends(require_scope(GATEWAY_MANAGE, explicit=True))]
ReaderDep = Annotated[Principal, Depends(require_scope(INFERENCE_READ))]


def _payload_problems(error: ValidationError) -> list[Problem]:
    return [
        Problem(loc_path(item["loc"]) or "(root)", item["msg"].removeprefix("Value error, "))
        for item in error.errors(include_url=False)
    ]


@router.get(
    "/health",
    response_model=GatewayHealth,
    responses={
        200: {
            "description": "the credential is valid",
            "headers": {
                PERMISSIONS_HEADER: {
                    "description": "the credential's scopes, comma-separated",
                    "schema": {"type": "string"},
                }
            },
        },
        401: error_response("missing or unknown key", HTTPError),
        403: error_response("a scope list without llm-inference:read", HTTPError),
    },
)
async def health(principal: ReaderDep) -> JSONResponse:
    scopes = permissions(principal)
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
        403: error_response(
            "neither the admin token nor a credential with llm-gateway:manage", HTTPError
        ),
        409: {"description": "a provider of that name exists; nothing changed"},
        413: error_response("body over MAX_BODY_BYTES", HTTPError),
        422: {"description": "every problem of the payload, with its path; nothing changed"},
        424: {"description": "the provider failed its health check; nothing changed"},
    },
    openapi_extra=json_request_body(ProviderRegistration),
)
async def register_provider(
    principal: ManagerDep, body: LimitedBodyDep, provisioner: ProvisionerDep
) -> Any:
    try:
        registration = ProviderRegistration.model_validate_json(body)
    except ValidationError as error:
        return problems_response(
            422, "the provider registration is invalid", _payload_problems(error)
        )
    result = await provisioner.add_provider(registration.provider_entry(), audit_actor(principal))
    if result.ok:
        return _registered(registration, result)
    problems = [Problem(payload_path(p.path, result.added_at), p.message) for p in result.problems]
    if result.exists:
        return problems_response(409, f"provider {registration.name!r} already exists", problems)
    if result.outcome == "invalid":
        return problems_response(
            422, "the provider registration is invalid; nothing changed", problems
        )
    if result.outcome == "health_check_failed":
        return problems_response(424, "provider health check failed; nothing changed", problems)
    return problems_response(500, "the configuration change failed; nothing changed", problems)


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
