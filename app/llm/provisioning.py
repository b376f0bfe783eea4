"""Changing the provider configuration at run time: validated, health-checked, atomic, audited.

An operator replaces the whole configuration at once. A candidate must validate completely (and
still serve LLM_MODEL, which the webhooks ask for); every key of every provider it adds or changes
is probed, and each such provider must serve with at least one (the keys that fail are reported
and start set aside); only then is a new router built and swapped into the RouterSlot. Requests
in flight keep the router they read, so nothing is cut off and the old router is never modified.
Every attempt, good or bad, is written to the audit log; a change that took effect is also
persisted, so a restart comes back with it, and announced to ADMIN_NOTIFY_URLS.

Key directives in a configuration sent through the API are resolved by the DirectivePolicy
(app.llm.directives): in validation and in the health check alike, so a directive it refuses is
a problem of the candidate and its value is never sent to a provider. Only a provider the change
leaves pointing where it pointed (same name, kind, URLs, auth header, token URL) keeps the
directives it had, whatever they name: the operator chose them in the provider file.

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Any

import httpx

from app.auth.signatures import fingerprint
from app.core.errors import ConfigError
from app.llm.base_config import BaseConfig, stored_candidate, validate_candidate
from app.llm.catalog import (
    KeyResolver,
    Problem,
    ProviderConfig,
    ProviderConfigInvalid,
    ProviderSpec,
    canonical_json,
    resolve_key,
)
from app.llm.directives import DirectivePolicy
from app.llm.notifications import ChangeNotifier, public_url
from app.llm.router import LLMRouter, RouterOptions, RouterSlot
from app.llm.routes import build_client
from app.llm.types import StreamingProviderClient
from app.store.audit import AuditAction, AuditLog, AuditRecord, AuditResult

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
    unhealthy_keys: list[UnhealthyKey] = field(default_factory=list)
    exists: bool = False  # add_provider: a provider of that name is configured already
    added_at: str = ""  # add_provider: the new entry's path in the candidate (`providers[2]`)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class UnhealthyKey:
    """A key that failed its probe: named by its fingerprint (as in the logs) and its masked
    directive (which variable or file to fix), never by the key."""

    provider: str
    index: int  # position in the provider's api_keys
    key_id: str
    source: str

    def __str__(self) -> str:
        return f"{self.provider} key {self.key_id} ({self.source})"


@dataclass(frozen=True)
class _ProviderProbe:
    url: str
    passed: bool  # the provider served with at least one of its keys (or without one)
    failed: list[UnhealthyKey]
    keys: int  # how many keys were probed (0: a provider without keys, or behind OAuth)


SUPERSEDED_RETRIES = 3


@dataclass(frozen=True)
class _Attempt:
    """What every audit record of one operation shares."""

    action: AuditAction
    actor: str
    digest: str
    started: float = field(default_factory=time.perf_counter)


class _Superseded(Exception):
    """The stored configuration changed while a change was being made (another worker)."""

    def __init__(self, attempt: _Attempt) -> None:
        super().__init__(attempt.action)
        self.attempt = attempt


@dataclass(eq=False, repr=False)
class Provisioner:
    """Validates, probes, swaps and reverts the configuration the router serves, audited."""

    _: KW_ONLY
    slot: RouterSlot
    http: httpx.AsyncClient
    base: BaseConfig
    router_options: RouterOptions
    notify_urls: list[str]
    audit: AuditLog
    source: str  # "applied", "providers_file" or "env"
    sha256: str | None = None  # of the configuration served (when not given: the slot's)
    directives: DirectivePolicy = field(default_factory=DirectivePolicy)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _notifier: ChangeNotifier = field(init=False)

    def __post_init__(self) -> None:
        self._notifier = ChangeNotifier(self.http, self.notify_urls)
        self.sha256 = self.sha256 or payload_sha256(self.slot.current.config)

    async def aclose(self) -> None:
        await self._notifier.aclose()

    # --- validation ------------------------------------------------------------------------------

    def validate(self, raw: object) -> list[Problem]:
        return self._validate(raw)[1]

    def _validate(self, raw: object) -> tuple[ProviderConfig | None, list[Problem]]:
        """The one check every configuration sent through the API passes (/admin, gateways)."""
        resolver = self.key_resolver(self.slot.current.config)
        return validate_candidate(raw, self.base.default_model, resolver)

    def key_resolver(self, current: ProviderConfig) -> KeyResolver:
        """Directives of an API candidate: the DirectivePolicy's, except those a provider keeps
        while it still points where it pointed in `current` (chosen in the provider file)."""

        def resolve(spec: ProviderSpec, directive: str, allow_literal: bool) -> str:
            if directive in _kept_directives(spec, current.provider(spec.name)):
                return resolve_key(directive, allow_literal=allow_literal, env=os.environ)
            return self.directives.resolve(directive, allow_literal=allow_literal, env=os.environ)

        return resolve

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
        return await self._changing(lambda: self._apply(raw, attempt))

    async def add_provider(self, entry: Mapping[str, Any], actor: str) -> ApplyResult:
        """The configuration in service plus one provider (a provider-file entry), applied as
        `apply` applies a whole one: validated, the new provider health-checked, swapped in,
        persisted and audited. Refused (audited as `invalid`, nothing changed) when a provider
        of that name exists (`exists`), when its model's name already leads elsewhere (a route,
        or another provider's model: the name would not reach it), and when the configuration
        holds literal keys that did not come through the API (the LLM_GATEWAY_* provider's,
        a provider file's): storing the result would copy them into the database. The
        candidate keeps the configuration's allow_literal_keys: a literal key is accepted only
        where that configuration allows literals."""

        async def add() -> ApplyResult:
            current = self.slot.current.config
            raw = current.model_dump(mode="json", exclude_unset=True)
            raw["providers"] = [*raw.get("providers", []), dict(entry)]
            attempt = _Attempt("apply", actor, payload_sha256(raw))
            added_at = f"providers[{len(current.providers)}]"
            name = str(entry.get("name", ""))
            refusal: Problem | None = None
            if self.source != "applied" and _holds_literal_keys(current):
                refusal = Problem(
                    "(service)",
                    "the configuration in service holds literal keys (the LLM_GATEWAY_* "
                    "provider, or a provider file's literal: keys), and a provider is added to "
                    "it and the result is stored: serve a PROVIDERS_FILE with env:/file: key "
                    "directives to register providers",
                )
            elif current.provider(name) is not None:
                refusal = Problem("name", f"provider {name!r} already exists")
            else:
                refusal = _model_taken(current, entry, added_at)
            if refusal is not None:
                result = await self._rejected(attempt, "invalid", [refusal])
                return replace(result, exists=refusal.path == "name", added_at=added_at)
            return replace(await self._apply(raw, attempt), added_at=added_at)

        return await self._changing(add)

    async def _apply(self, raw: object, attempt: _Attempt) -> ApplyResult:
        """Validate, health-check, swap, persist, audit; called with the lock held."""
        config, problems = self._validate(raw)
        if config is None or problems or not isinstance(raw, Mapping):
            return await self._rejected(attempt, "invalid", problems)
        failures, unhealthy = await self._health_check(config, self.slot.current.config)
        if failures:
            return await self._rejected(attempt, "health_check_failed", failures)
        try:
            router = LLMRouter(self.http, config, self.router_options)
            _set_aside(router, unhealthy)
            stored = await self.audit.save_applied(
                canonical_json(raw), attempt.digest, attempt.actor, expected=self._stored_sha256
            )
        except Exception as error:
            return await self._failed(attempt, error)
        if not stored:  # another worker stored a change since this one caught up: again
            raise _Superseded(attempt)
        self.slot.swap(router)  # the old router is left alone: requests on it finish there
        self.source, self.sha256 = "applied", attempt.digest
        return await self._changed(attempt, config, unhealthy)

    async def revert(self, actor: str) -> ApplyResult:
        """Forget the applied configuration; serve PROVIDERS_FILE (or the env provider) again.

        No health check: this is the way back when an applied configuration misbehaves, and it
        must not be blocked by the outage it is meant to escape."""
        attempt = _Attempt("revert", actor, "")
        async with self._lock:
            try:
                config = self.base.load()
            except ConfigError as error:
                return await self._rejected(attempt, "invalid", _config_error_problems(error))
            attempt = replace(attempt, digest=payload_sha256(config))
            try:
                router = LLMRouter(self.http, config, self.router_options)
                await self.audit.clear_applied()
            except Exception as error:
                return await self._failed(attempt, error)
            self.slot.swap(router)
            self.source, self.sha256 = self.base.source, attempt.digest
            return await self._changed(attempt, config)

    async def apply_built(
        self, build: Callable[[ProviderConfig], object], actor: str
    ) -> ApplyResult:
        """Apply the candidate `build` makes from the configuration in service, read under the
        lock: a change that adds to the configuration (a gateway) never drops another change
        applied meanwhile. Like every change, it ends in `_apply`, whose validation holds the
        API's directive policy."""
        started = time.perf_counter()

        async def built() -> ApplyResult:
            raw = build(self.slot.current.config)
            return await self._apply(raw, _Attempt("apply", actor, payload_sha256(raw), started))

        return await self._changing(built)

    @property
    def _stored_sha256(self) -> str | None:
        """The applied configuration's digest as this worker believes it stored (None: none)."""
        return self.sha256 if self.source == "applied" else None

    async def _changing(self, change: Callable[[], Awaitable[ApplyResult]]) -> ApplyResult:
        """Make a change under the lock (this process's, then the one the workers sharing
        DATA_DIR share), first catching up with a configuration another worker applied or
        reverted since this one last looked, so a change that adds to the configuration (a
        provider, a gateway) builds on it instead of dropping it; save_applied's
        compare-and-swap is the check that nothing was stored in between (again if it was)."""
        async with self._lock, self.audit.change_lock():
            for _ in range(SUPERSEDED_RETRIES):
                await self._catch_up()
                try:
                    return await change()
                except _Superseded as superseded:
                    attempt = superseded.attempt
            error = RuntimeError(
                "the stored configuration kept changing under this change (other workers "
                "applying at the same moment): send it again"
            )
            return await self._failed(attempt, error)

    async def _catch_up(self) -> None:
        """Serve what is stored when another worker changed it: the configuration it applied
        (checked by that worker's health check, as at start-up), or the base after a revert."""
        applied = await self.audit.load_applied()
        stored = applied["sha256"] if applied is not None else None
        if stored == self._stored_sha256:
            return
        if applied is None:
            try:
                config, source, digest = self.base.load(), self.base.source, None
            except ConfigError:
                return  # the base no longer loads: keep serving what this worker serves
        else:
            loaded, problems = stored_candidate(applied, self.base.default_model)
            if loaded is None or problems:
                return
            config, source, digest = loaded, "applied", stored
        self.slot.swap(LLMRouter(self.http, config, self.router_options))
        self.source, self.sha256 = source, digest or payload_sha256(config)
        log.info(
            "serving the provider configuration another worker %s",
            "applied" if applied is not None else "reverted to",
            extra={"config_sha256": self.sha256, "source": source},
        )

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

    async def _changed(
        self,
        attempt: _Attempt,
        config: ProviderConfig,
        unhealthy: list[UnhealthyKey] | None = None,
    ) -> ApplyResult:
        unhealthy = unhealthy or []
        providers = [p.name for p in config.providers]
        routes = [r.name for r in config.routes]
        detail = f"providers: {', '.join(providers)}; routes: {', '.join(routes) or 'none'}"
        if config.client_keys:  # their ids: which keys' scopes the configuration decides
            detail += f"; client key scopes: {', '.join(sorted(config.client_keys))}"
        if unhealthy:
            detail += f"; unhealthy keys: {', '.join(str(k) for k in unhealthy)}"
        record = await self._record(attempt, "ok", detail)
        where: dict[str, object] = {
            "actor": attempt.actor,
            "config_sha256": attempt.digest,
            "source": self.source,
        }
        if unhealthy:
            where["unhealthy_keys"] = [f"{k.provider}:{k.key_id}" for k in unhealthy]
        log.warning("provider configuration %s: changed", attempt.action, extra=where)
        self._notifier.notify(NOTIFY_EVENT, record.as_dict())
        return ApplyResult("ok", attempt.digest, [], record, providers, routes, unhealthy)

    def notify(self, event: str, payload: dict[str, Any]) -> None:
        """Announce an event to ADMIN_NOTIFY_URLS (fire-and-forget, as a configuration change)."""
        self._notifier.notify(event, payload)

    async def record(
        self,
        *,
        action: AuditAction,
        actor: str,
        digest: str,
        started: float,
        result: AuditResult,
        detail: str,
    ) -> AuditRecord:
        """An audit record of a step taken beside the configuration (a gateway's creation)."""
        return await self._record(_Attempt(action, actor, digest, started), result, detail)

    async def _failed(self, attempt: _Attempt, error: Exception) -> ApplyResult:
        log.exception("provider configuration %s failed unexpectedly", attempt.action)
        problem = Problem("(server)", f"{type(error).__name__}: {error}"[:300])
        record = await self._record(attempt, "error", problem.message)
        return ApplyResult("error", attempt.digest, [problem], record)

    async def _record(self, attempt: _Attempt, result: AuditResult, detail: str) -> AuditRecord:
        return await self.audit.append(
            actor=attempt.actor,
            action=attempt.action,
            payload_sha256=attempt.digest,
            result=result,
            latency_ms=(time.perf_counter() - attempt.started) * 1000,
            detail=detail,
        )

    # --- health check ----------------------------------------------------------------------------

    async def _health_check(
        self, config: ProviderConfig, current: ProviderConfig
    ) -> tuple[list[Problem], list[UnhealthyKey]]:
        """Probe, concurrently, every key of every provider that is new or whose spec changed.

        A provider passes when it serves with at least one key: a pool's revoked key, wherever
        it stands in the list, does not refuse the change (the router sets it aside) but is
        reported; a provider that serves with none of its keys is a problem."""
        changed = [
            (i, spec)
            for i, spec in enumerate(config.providers)
            if current.provider(spec.name) != spec
        ]
        resolver = self.key_resolver(current)
        probes = await asyncio.gather(
            *(self._probe(spec, config.allow_literal_keys, resolver) for _, spec in changed)
        )
        problems = [
            Problem(f"providers[{i}]", _failed_provider(spec.name, probe))
            for (i, spec), probe in zip(changed, probes, strict=True)
            if not probe.passed
        ]
        unhealthy = [key for probe in probes if probe.passed for key in probe.failed]
        return problems, unhealthy

    async def _probe(
        self, spec: ProviderSpec, allow_literal: bool, resolver: KeyResolver
    ) -> _ProviderProbe:
        """Each key once, all at once, each bounded by PROBE_TIMEOUT_SECONDS."""
        client = build_client(spec)
        url = public_url(str(getattr(client, "models_url", spec.base_url)))
        if not spec.api_keys:  # no key, or an OAuth token the client fetches itself
            return _ProviderProbe(url, await self._probe_key(client, None), [], 0)
        secrets: list[str | None] = []
        for directive in spec.api_keys:
            try:
                secrets.append(resolver(spec, str(directive), allow_literal))
            except ValueError:  # validated a moment ago; gone or refused since (a file swapped)
                secrets.append(None)
        served = await asyncio.gather(
            *(self._probe_key(client, s) if s is not None else _false() for s in secrets)
        )
        failed = [
            UnhealthyKey(
                spec.name,
                index,
                fingerprint(secret) if secret is not None else "unresolved",
                mask_directive(str(directive)),
            )
            for index, (directive, secret, ok) in enumerate(
                zip(spec.api_keys, secrets, served, strict=True)
            )
            if not ok
        ]
        return _ProviderProbe(url, any(served), failed, len(secrets))

    async def _probe_key(self, client: StreamingProviderClient, key: str | None) -> bool:
        try:
            return await asyncio.wait_for(
                client.probe(self.http, key, PROBE_TIMEOUT_SECONDS), PROBE_TIMEOUT_SECONDS
            )
        except (TimeoutError, ValueError, httpx.HTTPError):
            return False

    # --- display ---------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The configuration in service for display; keys as directives and fingerprints only."""
        router = self.slot.current
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
                    "key_rotation": spec.key_rotation,
                    "circuit": runtime.breaker.state,
                    "healthy_keys": sum(1 for k in keys if k["healthy"]),
                    "keys": keys,
                    "models": [m.model_dump(mode="json") for m in spec.models],
                }
            )
        return {
            "source": self.source,
            "sha256": self.sha256,
            "default_model": self.base.default_model,
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


def _kept_directives(spec: ProviderSpec, before: ProviderSpec | None) -> frozenset[str]:
    """The directives `before` had, if `spec` still sends keys where `before` sent them."""
    if before is None:
        return frozenset()
    if (spec.kind, spec.base_url, spec.transport, spec.ws_url, spec.auth_header) != (
        before.kind,
        before.base_url,
        before.transport,
        before.ws_url,
        before.auth_header,
    ):
        return frozenset()
    kept = {d for d in before.api_keys if isinstance(d, str)}
    same_token_url = (
        spec.oauth is not None
        and before.oauth is not None
        and spec.oauth.token_url == before.oauth.token_url
    )
    if same_token_url and before.oauth is not None and isinstance(before.oauth.client_secret, str):
        kept.add(before.oauth.client_secret)
    return frozenset(kept)


def _failed_provider(name: str, probe: _ProviderProbe) -> str:
    with_keys = {0: "", 1: " with its key"}.get(probe.keys, f" with any of its {probe.keys} keys")
    ids = f" ({', '.join(k.key_id for k in probe.failed)})" if probe.failed else ""
    return (
        f"provider {name!r} failed the health check: GET {probe.url}{with_keys}{ids} did not "
        f"return 200 with a model list (unreachable, key refused, not a provider's answer, or no "
        f"answer within {PROBE_TIMEOUT_SECONDS:g}s)"
    )


def _holds_literal_keys(config: ProviderConfig) -> bool:
    return any(
        isinstance(d, str) and d.startswith("literal:")
        for p in config.providers
        for d in p.api_keys
    )


def _model_taken(current: ProviderConfig, entry: Mapping[str, Any], at: str) -> Problem | None:
    """A new provider's model is reached by its name only when nothing else answers to it."""
    models = entry.get("models")
    names = (
        [m.get("name") for m in models if isinstance(m, Mapping)]
        if isinstance(models, list)
        else []
    )
    for i, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if current.route(name) is not None:
            where = f"route {name!r}"
        else:
            owner = next(
                (p.name for p in current.providers for m in p.models if m.name == name), None
            )
            if owner is None:
                continue
            where = f"provider {owner!r}'s model of that name"
        return Problem(
            f"{at}.models[{i}].name",
            f"{name!r} already leads to {where}: a call naming it would not reach this provider "
            "(use another model name, or chain both in a route with PUT /admin/config)",
        )
    return None


async def _false() -> bool:
    return False


def _set_aside(router: LLMRouter, unhealthy: list[UnhealthyKey]) -> None:
    """The new router starts with the keys that failed their probe set aside, as if a call had
    been refused with them: no turn tries them first, and the periodic re-probe brings each
    back once it works."""
    for key in unhealthy:
        pool = router.providers[key.provider].keys
        if key.index < len(pool.keys):
            pool.mark_unauthorized(pool.keys[key.index], None)


def _summary(problems: list[Problem]) -> str:
    return "; ".join(str(p) for p in problems)


def _config_error_problems(error: ConfigError) -> list[Problem]:
    cause = error.__cause__
    if isinstance(cause, ProviderConfigInvalid):
        return cause.problems
    return [Problem("routes", str(error))]
