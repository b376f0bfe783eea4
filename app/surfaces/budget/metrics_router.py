"""GET /api/v1/llm/gateway/metrics?page=&size=: the budgets tutorial's (001) historical
metrics, `{"items": [...]}` newest first, from the usage ledger of the caller's tenant only
(the admin token may pick one with `?tenant=`, as on /budget/*).

Page numbers over a ledger that keeps growing: page 2 read a moment after page 1 may repeat a
record that a newer call pushed down. /budget/usage's cursors do not; they are the way to walk
a large ledger (a deep page here reads every record before it)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from app.deps import StoreDep
from app.http.caller import UsageReaderDep
from app.http.openapi import HTTPError, error_response
from app.store import MAX_PAGE_SIZE, Store, UsageRecord
from app.surfaces.budget.router import FOREIGN_TENANT, tenant_of

router = APIRouter(prefix="/api/v1/llm/gateway", tags=["gateway"])
MAX_RECORDS_SKIPPED = 100_000  # page x size beyond this: use /budget/usage's cursors


@router.get(
    "/metrics",
    responses={
        400: error_response("page x size too deep", HTTPError),
        401: error_response("missing or unknown client API key or token", HTTPError),
        403: FOREIGN_TENANT,
    },
)
async def metrics(
    principal: UsageReaderDep,
    store: StoreDep,
    page: Annotated[int, Query(ge=1)] = 1,
    size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100,
    tenant: str | None = None,
) -> dict[str, Any]:
    """One page of usage records, each a call's tokens, cost, model and latency."""
    skipped = (page - 1) * size
    if skipped > MAX_RECORDS_SKIPPED:
        raise HTTPException(
            400,
            f"page {page} of size {size} is deeper than {MAX_RECORDS_SKIPPED} records: walk "
            "the ledger with /budget/usage's cursors instead",
        )
    items, more = await _page(store, tenant_of(principal, tenant), skipped, size)
    return {
        "items": [r.as_dict() for r in items],
        "page": page,
        "size": size,
        "has_more": more,
    }


async def _page(
    store: Store, tenant: str, skipped: int, size: int
) -> tuple[list[UsageRecord], bool]:
    cursor: str | None = None
    while skipped > 0:  # through the records before the page, a store page at a time
        chunk = await store.list_usage(tenant, limit=min(skipped, MAX_PAGE_SIZE), cursor=cursor)
        skipped -= len(chunk.records)
        cursor = chunk.next_cursor
        if cursor is None:
            return [], False
    found = await store.list_usage(tenant, limit=size, cursor=cursor)
    return found.records, found.next_cursor is not None
