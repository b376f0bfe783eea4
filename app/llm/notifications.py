"""Announcing configuration changes to ADMIN_NOTIFY_URLS (a chat webhook, an incident tool).

Fire-and-forget: an operator's change must not wait on, or fail because of, a notification
receiver. Tasks are kept in a set (so they are not garbage-collected mid-flight) and given their
timeout to finish on shutdown. A failure is a WARNING, never an exception; the URL is logged
without its path, because a chat webhook's path is often its secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

log = logging.getLogger("cxrelay.notifications")

NOTIFY_TIMEOUT_SECONDS = 5.0


class ChangeNotifier:
    def __init__(
        self,
        http: httpx.AsyncClient,
        urls: Sequence[str],
        timeout: float = NOTIFY_TIMEOUT_SECONDS,
    ) -> None:
        self._http = http
        self._urls = list(urls)
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, event: str, payload: dict[str, Any]) -> None:
        """POST `{"event": event, **payload}` to every URL in the background."""
        body = {"event": event, **payload}
        for url in self._urls:
            task = asyncio.create_task(self._post(url, body), name="admin-notify")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        where = {"notify_url": public_url(url, path=False)}
        try:
            response = await self._http.post(url, json=body, timeout=self._timeout)
        except Exception as error:
            log.warning(
                "configuration-change notification failed",
                extra={**where, "error": type(error).__name__},
            )
            return
        if response.status_code >= 300:
            log.warning(
                "configuration-change notification refused",
                extra={**where, "status": response.status_code},
            )

    async def aclose(self) -> None:
        """Give notifications in flight their timeout to finish, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self._timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def public_url(url: str, *, path: bool = True) -> str:
    """A URL without credentials (user:password@) and, if asked, without path and query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "(unparsable URL)"
    if not path:
        return urlunsplit((parts.scheme, netloc, "", "", ""))
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
