"""The one factory for the shared outbound HTTP client.

Every outbound call (LLM providers, CXone, token endpoints) goes through the client built here,
once per process in the lifespan, so pool limits and timeouts are set in one place and the
transport can be swapped after measuring without touching any caller.
"""

from __future__ import annotations

import httpx

from app.config import Settings


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        settings.llm_timeout_seconds, connect=settings.http_connect_timeout_seconds
    )
    limits = httpx.Limits(
        max_connections=settings.http_max_connections,
        max_keepalive_connections=settings.http_max_keepalive_connections,
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)
