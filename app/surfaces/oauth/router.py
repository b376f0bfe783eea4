"""POST /api/v1/auth/token (and /oauth/token): OAuth2 client credentials (RFC 6749 4.4).

The client authenticates with HTTP Basic (the RFC's preferred way, 2.3.1) or with `client_id`
and `client_secret` in the form; the answer is RFC 6749 5.1's JSON (`access_token`,
`token_type: Bearer`, `expires_in`, `scope`), or 5.2's error JSON (`error`,
`error_description`): 401 `invalid_client`, 400 for the rest. The token works wherever a client
key does, within its scopes (app.auth.tokens)."""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.accounting.inbound_limits import InboundLimiter
from app.auth.tokens import AccessTokens, TokenRequestRefused
from app.core.errors import RateLimited
from app.deps import ClientAuthDep, LimiterDep
from app.http.body import LimitedBodyDep
from app.http.caller import record_auth_failure

router = APIRouter(tags=["oauth"])
log = logging.getLogger("cxrelay.oauth")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 5.1


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    scope: str


class TokenError(BaseModel):
    error: str
    error_description: str


FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["grant_type"],
                    "properties": {
                        "grant_type": {"type": "string", "enum": ["client_credentials"]},
                        "client_id": {"type": "string"},
                        "client_secret": {"type": "string"},
                        "scope": {"type": "string", "description": "space-separated scopes"},
                    },
                }
            }
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": TokenError,
        "description": "invalid_request, unsupported_grant_type, invalid_scope",
    },
    401: {"model": TokenError, "description": "invalid_client: unknown client or wrong secret"},
    429: {
        "model": TokenError,
        "description": "too_many_attempts: too many failed requests for this client_id or from "
        "this address (OAUTH_MAX_FAILURES_PER_*); Retry-After says when to try again",
    },
}


async def token(
    request: Request, body: LimitedBodyDep, client_auth: ClientAuthDep, limiter: LimiterDep
) -> Any:
    tokens = client_auth.tokens
    try:
        if tokens is None or not tokens.configured:
            raise TokenRequestRefused(
                "invalid_client", "no OAuth clients are configured here (OAUTH_CLIENTS)", 401
            )
        issued = await _issue(request, body, tokens, limiter)
    except TokenRequestRefused as refused:
        return _refusal(request, refused)
    except RateLimited as limited:
        headers = {**NO_STORE, "Retry-After": str(limited.retry_after_header)}
        body_ = {"error": "too_many_attempts", "error_description": str(limited)}
        return JSONResponse(body_, status_code=429, headers=headers)
    return JSONResponse(issued, headers=NO_STORE)


for path in ("/api/v1/auth/token", "/oauth/token"):  # 001's path, and 002's
    router.post(
        path,
        response_model=TokenResponse,
        responses=ERRORS,
        openapi_extra=FORM,
        summary="OAuth2 client credentials: an access token",
        operation_id=f"token{path.replace('/', '_')}",
    )(token)


async def _issue(
    request: Request, body: bytes, tokens: AccessTokens, limiter: InboundLimiter
) -> dict[str, Any]:
    form = _form(request, body)
    grant = form.get("grant_type")
    if grant is None:
        raise TokenRequestRefused("invalid_request", "grant_type is missing")
    if grant != "client_credentials":
        raise TokenRequestRefused(
            "unsupported_grant_type", f"grant_type {grant!r} is not supported: client_credentials"
        )
    client_id, secret = _client_credentials(request, form)
    # a guess is counted before it is checked (429 once over), given back when it was right
    attempt = await limiter.token_attempt(
        client_id, request.client.host if request.client else "unknown"
    )
    client = tokens.client(client_id, secret)
    await limiter.attempt_succeeded(attempt)
    issued = tokens.issue(client, form.get("scope"))
    log.info(
        "access token issued",
        extra={"tenant": client.tenant, "key_id": client.key_id, "scope": sorted(issued.scopes)},
    )
    return issued.as_dict()


def _form(request: Request, body: bytes) -> dict[str, str]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise TokenRequestRefused(
            "invalid_request",
            "send the parameters as application/x-www-form-urlencoded (RFC 6749 4.4.2)",
        )
    try:
        parsed = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise TokenRequestRefused("invalid_request", "the form is not readable") from None
    repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
    if repeated:
        raise TokenRequestRefused("invalid_request", f"repeated parameter: {', '.join(repeated)}")
    return {name: values[0] for name, values in parsed.items()}


def _client_credentials(request: Request, form: dict[str, str]) -> tuple[str, str]:
    """HTTP Basic (each part form-encoded first, RFC 6749 2.3.1) or the form's pair; both at
    once is invalid_request (2.3: one method per request)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    in_form = "client_secret" in form
    if scheme.lower() == "basic":
        if in_form:
            raise TokenRequestRefused(
                "invalid_request", "send the client secret in Basic or in the form, not both"
            )
        try:
            pair = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, ValueError):
            raise TokenRequestRefused(
                "invalid_client", "Authorization: Basic is not base64 of client_id:secret", 401
            ) from None
        client_id, sep, secret = pair.partition(":")
        if not sep:
            raise TokenRequestRefused("invalid_client", "Basic credentials lack a ':'", 401)
        return unquote_plus(client_id), unquote_plus(secret)
    if not in_form or not form.get("client_id"):
        raise TokenRequestRefused(
            "invalid_client",
            "no client authentication: HTTP Basic, or client_id and client_secret in the form",
            401,
        )
    return form["client_id"], form["client_secret"]


def _refusal(request: Request, refused: TokenRequestRefused) -> JSONResponse:
    headers = dict(NO_STORE)
    if refused.status == 401:
        reason = "disabled" if "OAUTH_CLIENTS" in refused.description else "invalid"
        record_auth_failure(log, "token request refused", request, reason, refused.description)
        headers["WWW-Authenticate"] = 'Basic realm="cx-relay"'  # RFC 6749 5.2
    body = {"error": refused.error, "error_description": refused.description}
    return JSONResponse(body, status_code=refused.status, headers=headers)
