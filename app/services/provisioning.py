"""Changing the provider configuration at run time: validated, health-checked, atomic, audited.

An operator replaces the whole configuration at once. A candidate must validate completely (and
still serve LLM_MODEL, which the webhooks ask for); every provider it adds or changes must answer
a key probe; only then is a new router built and swapped into the RouterSlot. Requests in flight
keep the router they read, so nothing is cut off and the old router is never modified. Every
attempt, good or bad, is written to the audit log; a change that took effect is also persisted,
so a restart comes back with it, and announced to ADMIN_NOTIFY_URLS.

Applies and reverts are serialised by one lock: two operators cannot interleave a
probe-then-swap and end with a configuration nobody applied.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from app.config import Settings
from app.errors import ConfigError
from app.services.audit import AuditAction, AuditLog, AuditRecord, AuditResult
from app.services.llm.bootstrap import (
    base_source,
    initial_provider_config,
    router_options,
    validate_candidate,
)
from app.services.llm.catalog import (
    Problem,
    ProviderConfig,
    ProviderConfigInvalid,
    ProviderSpec,
    canonical_json,
    resolve_key,
)
from app.services.llm.router import LLMRouter, RouterSlot
from app.services.llm.routes import build_client
from app.services.notifications import ChangeNotifier, public_url

log = logging.getLogger("cxrelay.provisioning")

PROBE_TIMEOUT_SECONDS = 5.0
NOTIFY_EVENT = "provider_config_changed"


def payload_sha256(payload: object) -> str:
    """SHA-256 of the canonical JSON of what was submitted (or of the configuration loaded)."""
    try:
        text = canonical_json(payload)  # type: ignore[arg-type]  # any JSON value serialises
    except (TypeError, ValueError):  # YAML can carry dates and other non-JSON values
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ApplyResult:
    outcome: AuditResult
    sha256: str
    problems: list[Problem] = field(default_factory=list)
    record: AuditRecord | None = None
    providers: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class _Attempt:
    """What every audit record of one operation shares."""

    action: AuditAction
    actor: str
    digest: str
    started: float = field(default_factory=time.perf_counter)


class Provisioner:
    def __init__(
        self,
        *,
        slot: RouterSlot,
        http: httpx.AsyncClient,
        settings: Settings,
        audit: AuditLog,
        source: str,
        sha256: str | None = None,
    ) -> None:
        self._slot = slot
        self._http = http
        self._settings = settings
        self._audit = audit
        self._lock = asyncio.Lock()
        self._notifier = ChangeNotifier(http, settings.admin_notify_urls)
        self.source = source  # "applied", "providers_file" or "env"
        self.sha256 = sha256 or payload_sha256(slot.current.config)

    async def aclose(self) -> None:
        await self._notifier.aclose()

    # --- validation ------------------------------------------------------------------------------

    def validate(self, raw: object) -> list[Problem]:
        return validate_candidate(raw, self._settings)[1]

    async def dry_run(self, raw: object, actor: str) -> list[Problem]:
        """Validate without changing anything; audited as `validate` (no provider is called)."""
        attempt = _Attempt("validate", actor, payload_sha256(raw))
        problems = self.validate(raw)
        await self._record(attempt, "invalid" if problems else "ok", _summary(problems))
        return problems

    async def record_unparsable(
        self, action: AuditAction, actor: str, body: bytes, problems: list[Problem]
    ) -> AuditRecord:
        """A body that does not parse is audited as `invalid`, hashed as the bytes received."""
        attempt = _Attempt(action, actor, hashlib.sha256(body).hexdigest())
        return await self._record(attempt, "invalid", _summary(problems))

    # --- apply and revert ------------------------------------------------------------------------

    async def apply(self, raw: object, actor: str) -> ApplyResult:
        attempt = _Attempt("apply", actor, payload_sha256(raw))
        async with self._lock:
            config, problems = validate_candidate(raw, self._settings)
            if config is None or problems or not isinstance(raw, Mapping):
                return await self._rejected(attempt, "invalid", problems)
            failures = await self._health_check(config, self._slot.current.config)
            if failures:
                return await self._rejected(attempt, "health_check_failed", failures)
            try:
                router = LLMRouter(self._http, config, router_options(self._settings))
                await self._audit.save_applied(canonical_json(raw), attempt.digest, actor)
            except Exception as error:
                return await self._failed(attempt, error)
            self._slot.swap(router)  # the old router is left alone: requests on it finish there
            self.source, self.sha256 = "applied", attempt.digest
            return await self._changed(attempt, config)

    async def revert(self, actor: str) -> ApplyResult:
        """Forget the applied configuration; serve PROVIDERS_FILE (or the env provider) again.

        No health check: this is the way back when an applied configuration misbehaves, and it
        must not be blocked by the outage it is meant to escape."""
        attempt = _Attempt("revert", actor, "")
        async with self._lock:
            try:
                config = initial_provider_config(self._settings)
            except ConfigError as error:
                return await self._rejected(attempt, "invalid", _config_error_problems(error))
            attempt = replace(attempt, digest=payload_sha256(config))
            try:
                router = LLMRouter(self._http, config, router_options(self._settings))
                await self._audit.clear_applied()
            except Exception as error:
                return await self._failed(attempt, error)
            self._slot.swap(router)
            self.source, self.sha256 = base_source(self._settings), attempt.digest
            return await self._changed(attempt, config)

    async def _rejected(
        self, attempt: _Attempt, result: AuditResult, problems: list[Problem]
    ) -> ApplyResult:
        """Nothing changed: the candidate was invalid or one of its providers did not answer."""
        record = await self._record(attempt, result, _summary(problems))
        log.warning(
            "provider configuration %s refused (%s)",
            attempt.action,
            result,
            extra={"actor": attempt.actor, "config_sha256": attempt.digest},
        )
        return ApplyResult(result, attempt.digest, problems, record)

    async def _changed(self, attempt: _Attempt, config: ProviderConfig) -> ApplyResult:
        providers = [p.name for p in config.providers]
        routes = [r.name for r in config.routes]
        detail = f"providers: {', '.join(providers)}; routes: {', '.join(routes) or 'none'}"
        record = await self._record(attempt, "ok", detail)
        where = {"actor": attempt.actor, "config_sha256": attempt.digest, "source": self.source}
        log.warning("provider configuration %s: changed", attempt.action, extra=where)
        self._notifier.notify(NOTIFY_EVENT, record.as_dict())
        return ApplyResult("ok", attempt.digest, [], record, providers, routes)

    async def _failed(self, attempt: _Attempt, error: Exception) -> ApplyResult:
        log.exception("provider configuration %s failed unexpectedly", attempt.action)
        problem = Problem("(server)", f"{type(error).__name__}: {error}"[:300])
        record = await self._record(attempt, "error", problem.message)
        return ApplyResult("error", attempt.digest, [problem], record)

    async def _record(self, attempt: _Attempt, result: AuditResult, detail: str) -> AuditRecord:
        return await self._audit.append(
            actor=attempt.actor,
            action=attempt.action,
            payload_sha256=attempt.digest,
            result=result,
            latency_ms=(time.perf_counter() - attempt.started) * 1000,
            detail=detail,
        )

    # --- health check ----------------------------------------------------------------------------

    async def _health_check(self, config: ProviderConfig, current: ProviderConfig) -> list[Problem]:
        """Probe, concurrently, every provider that is new or whose spec changed."""
        changed = [
            (i, spec)
            for i, spec in enumerate(config.providers)
            if current.provider(spec.name) != spec
        ]
        results = await asyncio.gather(
            *(self._probe(spec, config.allow_literal_keys) for _, spec in changed)
        )
        return [
            Problem(
                f"providers[{i}]",
                f"provider {spec.name!r} failed the health check: GET {url} with its first key "
                f"did not return 200 (unreachable, key refused, or no answer within "
                f"{PROBE_TIMEOUT_SECONDS:g}s)",
            )
            for (i, spec), (passed, url) in zip(changed, results, strict=True)
            if not passed
        ]

    async def _probe(self, spec: ProviderSpec, allow_literal: bool) -> tuple[bool, str]:
        client = build_client(spec)
        url = public_url(str(getattr(client, "models_url", spec.base_url)))
        try:
            first = spec.api_keys[0] if spec.api_keys else None
            key = resolve_key(first, allow_literal=allow_literal, env=os.environ) if first else None
            passed = await asyncio.wait_for(
                client.probe(self._http, key, PROBE_TIMEOUT_SECONDS), PROBE_TIMEOUT_SECONDS
            )
        except (asyncio.TimeoutError, ValueError, httpx.HTTPError):
            passed = False
        return passed, url

    # --- display ---------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The configuration in service for display; keys as directives and fingerprints only."""
        router = self._slot.current
        now = time.monotonic()
        providers = []
        for spec in router.config.providers:
            runtime = router.providers[spec.name]
            keys = [
                {
                    "source": mask_directive(directive),
                    "key_id": key.key_id,
                    "healthy": key.healthy,
                    "cooling": key.cooling_until > now,
                }
                for directive, key in zip(spec.api_keys, runtime.keys.keys, strict=False)
            ]
            providers.append(
                {
                    "name": spec.name,
                    "kind": spec.kind,
                    "base_url": public_url(spec.base_url),
                    "timeout_seconds": spec.timeout_seconds,
                    "rpm": spec.rpm,
                    "tpm": spec.tpm,
                    "max_concurrent": spec.max_concurrent,
                    "circuit": runtime.breaker.state,
                    "healthy_keys": sum(1 for k in keys if k["healthy"]),
                    "keys": keys,
                    "models": [m.model_dump(mode="json") for m in spec.models],
                }
            )
        return {
            "source": self.source,
            "sha256": self.sha256,
            "default_model": self._settings.llm_model,
            "providers": providers,
            "routes": [r.model_dump(mode="json") for r in router.config.routes],
            "limits": limits.model_dump(mode="json", exclude_unset=True)
            if (limits := router.config.limits) is not None
            else None,
        }


def mask_directive(directive: str) -> str:
    """`env:NAME` and `file:/path` name where a key lives, not the key; a literal is hidden."""
    kind, sep, _ = directive.partition(":")
    if sep and kind in ("env", "file"):
        return directive
    return f"{kind}:***" if sep and kind == "literal" else "***"


def _summary(problems: list[Problem]) -> str:
    return "; ".join(str(p) for p in problems)


def _config_error_problems(error: ConfigError) -> list[Problem]:
    cause = error.__cause__
    if isinstance(cause, ProviderConfigInvalid):
        return cause.problems
    return [Problem("routes", str(error))]
