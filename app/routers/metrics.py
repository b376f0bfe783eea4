"""GET /metrics: the Prometheus text exposition of every cxrelay_* collector (every worker's,
added up, when there are several)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from app.services.metrics import exposition

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    body, content_type = await asyncio.to_thread(exposition)  # reads every worker's file
    return Response(body, media_type=content_type)
