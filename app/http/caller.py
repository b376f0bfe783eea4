"""The client credential every client route takes: a CLIENT_API_KEYS key, an access token from
POST /api/v1/auth/token (or the admin token); the scope a route asks of a scoped one; and how a
failed credential attempt on any route is recorded."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from starlette.requests import HTTPConnection

from app.core.errors import AuthenticationFailed
from app.core.principal import Principal
from app.core.scopes import INVOKE_SCOPES, READ_USAGE_SCOPES, missing_scope
from app.deps import ClientAuthDep
from app.observability.metrics import AUTH_FAILURES

log = logging.getLogger("cxrelay.clients")


def route_of(connection: HTTPConnection) -> str:
    """The matched route's template (`/budget/sessions/{session_id}`): a bounded metric label,
    unlike the path a caller sent."""
    path = getattr(connection.scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


def record_auth_failure(
    logger: logging.Logger, message: str, connection: HTTPConnection, reason: str, detail: str
) -> None:
    """Every failed credential attempt, on every route: counted in cxrelay_auth_failures_total
    {route, reason} and logged at WARNING with the route, the remote address, the reason (a word
    of AUTH_FAILURE_REASONS) and the detail the caller was told; never the presented secret
    (the log line's `ts` is the time)."""
    route = route_of(connection)
    AUTH_FAILURES.labels(route, reason).inc()
    logger.warning(
        message,
        extra={
            "route": route,
            "remote": connection.client.host if connection.client else "",
            "reason": reason,
            "detail": detail,
        },
    )


def bearer_failure(request: Request, secret: str) -> Literal["missing", "invalid"] | None:
    """None when `Authorization: Bearer <secret>` was sent, else why not. Compared in constant
    time over SHA-256 digests, so neither the content nor the length leaks through timing."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return "missing"
    expected = hashlib.sha256(secret.encode()).digest()
    if hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), expected):
        return None
    return "invalid"


def unauthorized(
    logger: logging.Logger,
    message: str,
    request: Request,
    failure: AuthenticationFailed,
    challenge: str | None = "Bearer",
) -> HTTPException:
    """The 401 for a failed credential, recorded (record_auth_failure); `challenge` is the
    WWW-Authenticate scheme, None where the caller is not told one (CXone)."""
    record_auth_failure(logger, message, request, failure.reason, str(failure))
    headers = {"WWW-Authenticate": challenge} if challenge else None
    return HTTPException(401, str(failure), headers=headers)


async def caller(request: Request, client_auth: ClientAuthDep) -> Principal:
    try:
        return await client_auth.verify(request.headers)
    except AuthenticationFailed as failure:
        raise unauthorized(log, "client authentication failed", request, failure) from None


CallerDep = Annotated[Principal, Depends(caller)]


def require_scope(*any_of: str, explicit: bool = False) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller (401 as `caller`), who must hold one of `any_of` when its
    credential has a scope list; 403 naming the scope otherwise, with RFC 6750's
    `WWW-Authenticate: Bearer error="insufficient_scope"`. A credential without a scope list
    (and the admin token) passes, as before scopes existed.

    `explicit=True` guards a right a key must be given (registering providers, provisioning
    gateways): the admin token passes, a credential only when its scope list holds one of
    `any_of`; a key without a scope list, which passes the other guards, is refused (it could
    not provision before scopes existed)."""

    async def scoped_caller(request: Request, principal: CallerDep) -> Principal:
        if explicit and principal.role == "admin":
            return principal
        problem = missing_scope(principal.scopes, any_of, explicit=explicit)
        if problem is None:
            return principal
        record_auth_failure(log, "client scope refused", request, "scope", problem)
        challenge = f'Bearer error="insufficient_scope", scope="{" ".join(any_of)}"'
        raise HTTPException(403, problem, headers={"WWW-Authenticate": challenge})

    return scoped_caller


# A caller of a route that calls a model (/chat, /v1/*, the gateway chat) or reads usage and
# cost (/budget/*, the gateway metrics): with a scope list, it must hold one of these.
InvokerDep = Annotated[Principal, Depends(require_scope(*INVOKE_SCOPES))]
UsageReaderDep = Annotated[Principal, Depends(require_scope(*READ_USAGE_SCOPES))]


def audit_actor(principal: Principal) -> str:
    """Who the audit log names for a change made with this credential: its role and
    fingerprint (and tenant), never the credential."""
    if principal.role == "admin":
        return f"admin:{principal.key_id}"
    return f"{principal.role}:{principal.key_id} ({principal.tenant})"
