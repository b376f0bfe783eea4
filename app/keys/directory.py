"""Each worker's copy of the client keys created at run time, so authenticating one costs a dict
look-up, not a store round trip.

A background task reads the registry's version every `refresh_seconds` (one small read) and
reloads every key only when it changed: a revoked or rotated key stops working on every worker
and replica within that interval plus one reload. A key this worker has not loaded yet (created a
moment ago through another worker) is looked up by its digest once, so it works on the very next
request; a digest found nowhere is remembered (a bounded set, emptied at each reload) so a caller
repeating a wrong key costs no further store reads.

When a key was last used is written in batches by the same task: a key is marked at most once per
`touch_seconds` in this worker, and the marks go out in one write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

from app.core.principal import Principal
from app.store.base import StoreUnavailable
from app.store.client_keys import ClientKeyRegistry, StoredClientKey

log = logging.getLogger("cxrelay.keys")

DEFAULT_REFRESH_SECONDS = 0.25
DEFAULT_TOUCH_SECONDS = 60.0
MAX_REMEMBERED_MISSES = 10_000


def principal_of(key: StoredClientKey) -> Principal:
    scopes = frozenset(key.scopes) if key.scopes is not None else None
    return Principal(key.tenant, key.id, "client", "api_key", scopes)


def iso(epoch_seconds: float) -> str:
    """As the audit log writes times: ISO-8601 UTC, milliseconds, `Z` (sortable as text)."""
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class KeyDirectory:
    """`await load()` once, then `run()` as a task for as long as the service serves."""

    def __init__(
        self,
        registry: ClientKeyRegistry,
        *,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        touch_seconds: float = DEFAULT_TOUCH_SECONDS,
    ) -> None:
        self.registry = registry
        self.refresh_seconds = refresh_seconds
        self.touch_seconds = touch_seconds
        # by the digest's bytes (as the authenticator has it), with its caller built once
        self._by_digest: dict[bytes, tuple[StoredClientKey, Principal]] = {}
        self._by_id: dict[str, StoredClientKey] = {}
        self._version = -1
        self._misses: set[str] = set()
        self._marked: dict[str, float] = {}  # id -> when this worker last marked it used
        self._pending: dict[str, str] = {}  # id -> ISO time, not written yet

    # --- the hot path ----------------------------------------------------------------------------

    def find(self, digest: bytes) -> Principal | None:
        """The caller of a loaded key, or None (then `fetch` asks the store)."""
        found = self._by_digest.get(digest)
        if found is None:
            return None
        self._mark_used(found[0].id)
        return found[1]

    async def fetch(self, digest: bytes) -> Principal | None:
        """A key not loaded yet, from the store; None when there is no such key (remembered) or
        the store cannot answer (logged: the caller gets 401, as for a wrong key)."""
        hexdigest = digest.hex()
        if hexdigest in self._misses:
            return None
        version = self._version
        try:
            key = await self.registry.by_digest(hexdigest)
        except StoreUnavailable as error:
            log.warning("client key look-up failed: %s", error)
            return None
        if key is None:
            if len(self._misses) >= MAX_REMEMBERED_MISSES:
                self._misses.clear()
            self._misses.add(hexdigest)
            return None
        principal = principal_of(key)
        if version == self._version:  # no reload in between that may have revoked it since
            self._by_digest[digest] = (key, principal)
            self._by_id[key.id] = key
        self._mark_used(key.id)
        return principal

    def loaded(self, key_id: str) -> StoredClientKey | None:
        return self._by_id.get(key_id)

    def all_loaded(self) -> list[StoredClientKey]:
        return list(self._by_id.values())

    def _mark_used(self, key_id: str) -> None:
        now = time.time()
        if now - self._marked.get(key_id, 0.0) >= self.touch_seconds:
            self._marked[key_id] = now
            self._pending[key_id] = iso(now)

    # --- the background task ---------------------------------------------------------------------

    async def load(self) -> None:
        """Every key, and the version they are of (read first: a change made during the read
        raises it past what is kept, so the next refresh reloads)."""
        version = await self.registry.version()
        keys = await self.registry.all()
        self._by_digest = {bytes.fromhex(key.digest): (key, principal_of(key)) for key in keys}
        self._by_id = {key.id: key for key in keys}
        self._misses = set()
        self._version = version

    async def refresh(self) -> bool:
        """Reload if anything changed; True if it did."""
        if await self.registry.version() == self._version:
            return False
        await self.load()
        return True

    async def flush(self) -> None:
        """Write the last-used marks gathered since the previous flush (one write)."""
        pending, self._pending = self._pending, {}
        try:
            await self.registry.touch(pending)
        except StoreUnavailable as error:
            log.warning("client key last-used times not written: %s", error)
            self._pending = {**pending, **self._pending}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
                if self._pending:
                    await self.flush()
            except StoreUnavailable as error:  # keep serving the keys last read; try again
                log.warning("client keys not refreshed: %s", error)
            except Exception:  # the loop must never end while the service serves
                log.exception("client key refresh failed")


class KeySessionTokens(Mapping[str, int | None]):
    """Each key's own per-session token budget by key id (BudgetPolicy.session_tokens_by_key):
    CLIENT_API_KEYS' entries, then the directory's keys that have one, read per call so a key
    created at run time has its budget at once."""

    def __init__(self, environment: Mapping[str, int | None], directory: KeyDirectory) -> None:
        self._environment = environment
        self._directory = directory

    def __getitem__(self, key_id: str) -> int | None:
        if key_id in self._environment:
            return self._environment[key_id]
        key = self._directory.loaded(key_id)
        if key is None or key.session_tokens is None:
            raise KeyError(key_id)
        return key.session_tokens

    def __iter__(self) -> Iterator[str]:
        yield from self._environment
        for key in self._directory.all_loaded():
            if key.session_tokens is not None and key.id not in self._environment:
                yield key.id

    def __len__(self) -> int:
        return sum(1 for _ in self)
