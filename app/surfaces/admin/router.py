"""/admin: the provisioning API. Thin — authenticate the operator, read the body, call the
Provisioner, map its outcome to a status code. Disabled (401) until ADMIN_TOKEN is set."""

from __future__ import annotations

import contextlib
import logging
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from app.auth.signatures import fingerprint
from app.core.errors import AuthenticationFailed, RateLimited
from app.core.principal import DEFAULT_TENANT, Principal
from app.deps import AuditLogDep, LimiterDep, ProvisionerDep, SettingsDep
from app.http.body import read_limited_body
from app.http.caller import bearer_failure, unauthorized
from app.http.openapi import HTTPError, error_response
from app.http.problems import ProblemOut, ProblemsResponse, problems_response
from app.llm.catalog import Problem, ProviderConfigInvalid, parse_provider_text
from app.llm.provisioning import ApplyResult, Provisioner
from app.store.audit import AuditAction
from app.surfaces.admin.schemas import (
    ApplyResponse,
    AuditPage,
    AuditRecordOut,
    ProvidersResponse,
    UnhealthyKeyOut,
    ValidateResponse,
)

log = logging.getLogger("cxrelay.admin")

JSON_TYPES = frozenset({"application/json"})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})
MAX_ACTOR_CHARS = 64
SQLITE_MAX_INT = 2**63 - 1  # the audit log's OFFSET: beyond it SQLite cannot take the number

_UNAUTHORIZED = error_response(
    "no ADMIN_TOKEN configured, or a missing or wrong bearer token", HTTPError
)
_THROTTLED = error_response(
    "too many wrong admin tokens from this address (ADMIN_MAX_FAILURES_PER_ADDRESS a minute); "
    "Retry-After says when to try again",
    HTTPError,
)
_BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: error_response("body over MAX_BODY_BYTES", HTTPError),
    415: error_response("body is neither application/json nor YAML", HTTPError),
}
_REVERT_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ProblemsResponse, "description": "invalid or unparsable; nothing changed"},
    424: {"model": ProblemsResponse, "description": "a provider failed its health check"},
    500: {"model": ProblemsResponse, "description": "the change failed; nothing changed"},
}
_CHANGE_RESPONSES = {**_BODY_RESPONSES, **_REVERT_RESPONSES}
_VALIDATE_RESPONSES = {**_BODY_RESPONSES, 422: _REVERT_RESPONSES[422]}


def _provider_file_body(json_schema: dict[str, Any]) -> dict[str, Any]:
    """The provider file (docs/providers.md), as JSON or as the YAML text an operator writes."""
    content = {"application/json": {"schema": json_schema}, "application/yaml": {"schema": {}}}
    return {"requestBody": {"required": True, "content": content}}


@dataclass(frozen=True)
class Admin:
    principal: Principal
    actor: str  # as written to the audit log: `name (admin:<fingerprint>)` or `admin:<fp>`


_REFUSALS = {
    "disabled": "the admin API is disabled until ADMIN_TOKEN is set",
    "missing": "missing admin credential: send Authorization: Bearer <ADMIN_TOKEN>",
    "invalid": "invalid admin token",
}


async def require_admin(request: Request, settings: SettingsDep, limiter: LimiterDep) -> Admin:
    """Authorization: Bearer <ADMIN_TOKEN> (bearer_failure: constant time over digests). Each
    attempt is counted against its address before the check and given back when the token was
    right, so wrong tokens beyond ADMIN_MAX_FAILURES_PER_ADDRESS a minute are answered 429, as
    the OAuth token endpoint does for wrong secrets."""
    token = settings.admin_token
    secret = token.get_secret_value() if token is not None else ""
    reason: str | None = "disabled"
    if secret:
        address = request.client.host if request.client else "unknown"
        try:
            attempt = await limiter.admin_attempt(address)
        except RateLimited as limited:
            headers = {"Retry-After": str(limited.retry_after_header)}
            raise HTTPException(429, str(limited), headers=headers) from None
        reason = bearer_failure(request, secret)
        if reason is None:
            await limiter.attempt_succeeded(attempt)
    if reason is not None:
        failure = AuthenticationFailed(_REFUSALS[reason], reason)
        raise unauthorized(log, "admin authentication failed", request, failure)
    key_id = fingerprint(secret)
    return Admin(
        Principal(DEFAULT_TENANT, key_id, "admin", "bearer"),
        actor_name(request.headers.get("x-actor"), key_id),
    )


def actor_name(header: str | None, key_id: str) -> str:
    """The token says which credential acted; X-Actor, when sent, says which person."""
    credential = f"admin:{key_id}"
    if not header:
        return credential
    with contextlib.suppress(UnicodeError):  # headers arrive as latin-1; UTF-8 names too
        header = header.encode("latin-1").decode("utf-8")
    name = "".join(ch for ch in header if not unicodedata.category(ch).startswith("C"))
    name = name.strip()[:MAX_ACTOR_CHARS].strip()
    return f"{name} ({credential})" if name else credential


AdminDep = Annotated[Admin, Depends(require_admin)]
router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={401: _UNAUTHORIZED, 429: _THROTTLED},
)


class _Unparsable(Exception):
    def __init__(self, body: bytes, problems: list[Problem]) -> None:
        self.body = body
        self.problems = problems


async def _candidate(request: Request, limit: int) -> object:
    """What the body says; JSON and YAML both go through the provider-file parser."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES | YAML_TYPES:
        raise HTTPException(
            415,
            "send the provider configuration as application/json or application/yaml "
            f"(got {media or 'no Content-Type'})",
        )
    body = await read_limited_body(request, limit)
    try:
        return parse_provider_text(body.decode("utf-8"), "request body")
    except UnicodeDecodeError:
        raise _Unparsable(body, [Problem("(root)", "the body is not UTF-8 text")]) from None
    except ProviderConfigInvalid as error:
        raise _Unparsable(body, error.problems) from None


async def _unparsable(
    provisioner: Provisioner, admin: Admin, action: AuditAction, error: _Unparsable
) -> JSONResponse:
    """Refused before validation, but still an attempt: audited as `invalid`."""
    await provisioner.record_unparsable(action, admin.actor, error.body, error.problems)
    return problems_response(422, "the body is not valid JSON or YAML", error.problems)


def _outcome(result: ApplyResult, invalid: str) -> ApplyResponse | JSONResponse:
    if result.ok:
        return ApplyResponse(
            applied=True,
            sha256=result.sha256,
            providers=result.providers,
            routes=result.routes,
            unhealthy_keys=[
                UnhealthyKeyOut(provider=k.provider, key_id=k.key_id, source=k.source)
                for k in result.unhealthy_keys
            ],
        )
    if result.outcome == "invalid":
        return problems_response(422, invalid, result.problems)
    if result.outcome == "health_check_failed":
        return problems_response(424, "provider health check failed", result.problems)
    return problems_response(
        500, "the configuration change failed; nothing changed", result.problems
    )


@router.get("/providers", response_model=ProvidersResponse)
async def providers(provisioner: ProvisionerDep) -> dict[str, Any]:
    return provisioner.describe()


@router.post(
    "/config/validate",
    response_model=ValidateResponse,
    responses=_VALIDATE_RESPONSES,
    openapi_extra=_provider_file_body({}),  # any document: the answer lists its problems
)
async def validate(
    request: Request, settings: SettingsDep, provisioner: ProvisionerDep, admin: AdminDep
) -> ValidateResponse | JSONResponse:
    """Dry run: every problem of the candidate, nothing changes, no provider is called."""
    try:
        raw = await _candidate(request, settings.max_body_bytes)
    except _Unparsable as error:
        return await _unparsable(provisioner, admin, "validate", error)
    problems = await provisioner.dry_run(raw, admin.actor)
    return ValidateResponse(valid=not problems, problems=[ProblemOut.of(p) for p in problems])


@router.put(
    "/config",
    response_model=ApplyResponse,
    responses=_CHANGE_RESPONSES,
    openapi_extra=_provider_file_body({"type": "object"}),
)
async def apply(
    request: Request, settings: SettingsDep, provisioner: ProvisionerDep, admin: AdminDep
) -> ApplyResponse | JSONResponse:
    try:
        raw = await _candidate(request, settings.max_body_bytes)
    except _Unparsable as error:
        return await _unparsable(provisioner, admin, "apply", error)
    result = await provisioner.apply(raw, admin.actor)
    return _outcome(result, "the provider configuration is invalid; nothing changed")


@router.delete("/config/applied", response_model=ApplyResponse, responses=_REVERT_RESPONSES)
async def revert(provisioner: ProvisionerDep, admin: AdminDep) -> ApplyResponse | JSONResponse:
    """Back to PROVIDERS_FILE (or the LLM_GATEWAY_* provider), forgetting the applied one."""
    result = await provisioner.revert(admin.actor)
    return _outcome(result, "the configuration to revert to is invalid; nothing changed")


@router.get("/audit", response_model=AuditPage)
async def audit(
    audit_log: AuditLogDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=SQLITE_MAX_INT)] = 0,
) -> AuditPage:
    records = await audit_log.list(limit, offset)
    return AuditPage(
        records=[AuditRecordOut.model_validate(r.as_dict()) for r in records],
        total=await audit_log.count(),
    )
