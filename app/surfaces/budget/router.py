"""Cost and usage reads: /budget/status, /budget/sessions/{id}, /budget/usage.

A client key sees its own tenant only; the admin token may pick one with `?tenant=`. The tenant
is never taken from anything else the caller sends, and another tenant's session is a 404 (not
a 403) so session ids cannot be probed. A session id read here goes through the same mapping as
on the chat surfaces (app.safety.session_ids), so a caller finds its session by the id it sent
while the answer only ever shows the stored one (a digest when the id holds personal data).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from app.core.principal import Principal
from app.deps import SessionIdsDep, StoreDep
from app.http.caller import UsageReaderDep
from app.http.openapi import HTTPError, error_response

router = APIRouter(
    prefix="/budget",
    tags=["budget"],
    responses={
        401: error_response("missing or unknown client API key", HTTPError),
        403: error_response(
            "another tenant asked for, or a scoped key or token without llm.gateway:metrics:read",
            HTTPError,
        ),
    },
)
FOREIGN_TENANT = error_response("a client key asked for another tenant", HTTPError)
log = logging.getLogger("cxrelay.budget")


def tenant_of(principal: Principal, requested: str | None) -> str:
    if requested is None or requested == principal.tenant:
        return principal.tenant
    if principal.role == "admin":
        return requested
    raise HTTPException(403, "a client key reads its own tenant only; omit ?tenant=")


@router.get("/status", responses={403: FOREIGN_TENANT})
async def status(
    principal: UsageReaderDep, store: StoreDep, tenant: str | None = None
) -> dict[str, Any]:
    """The tenant's totals, per-session costs and active sessions (the tutorial's
    `tenant_total_cost`, `session_costs` and `active_sessions` among them)."""
    report = await store.tenant_status(tenant_of(principal, tenant))
    body = report.as_dict()
    body["total_cost"] = report.totals.cost
    body["tenant_total_cost"] = report.totals.cost  # the budgets tutorial's (001) name
    body["session_costs"] = {s.session_id: s.totals.cost for s in report.sessions}
    return body


@router.get(
    "/sessions/{session_id}",
    responses={
        403: FOREIGN_TENANT,
        404: error_response("no such session for this tenant", HTTPError),
    },
)
async def session(
    session_id: str,
    principal: UsageReaderDep,
    store: StoreDep,
    session_ids: SessionIdsDep,
    tenant: str | None = None,
) -> dict[str, Any]:
    stored = session_ids.stored(session_id)
    summary = await store.session_summary(tenant_of(principal, tenant), stored)
    if summary is None:
        raise HTTPException(404, f"no session {stored!r} for this tenant")
    return summary.as_dict()


@router.get(
    "/usage",
    responses={400: error_response("invalid cursor", HTTPError), 403: FOREIGN_TENANT},
)
async def usage(
    principal: UsageReaderDep,
    store: StoreDep,
    session_ids: SessionIdsDep,
    tenant: str | None = None,
    session: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Usage records newest first; pass `next_cursor` back as `cursor` for the next page."""
    try:
        page = await store.list_usage(
            tenant_of(principal, tenant),
            session_ids.stored(session) if session else None,  # blank: every session
            limit=limit,
            cursor=cursor,
        )
    except ValueError as error:
        raise HTTPException(400, f"invalid cursor: {error}") from None
    return {"records": [r.as_dict() for r in page.records], "next_cursor": page.next_cursor}
