"""A gateway's life (the provisioning tutorial's unit, seed 002): created, it is only a stored
record (`pending_validation`): nothing routes to it. Its health check turns it into providers and
routes of the configuration in service through the Provisioner's apply (the same validation,
directive policy, key probe, atomic swap and audit as PUT /admin/config), then it is `active` and
its models answer as `<gateway name>/<model>`, or `failed` with the reasons. Every step is
audited with the SHA-256 of the gateway's payload, and each health check is announced to
ADMIN_NOTIFY_URLS with the tutorial's metrics of the last hour's health checks."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from app.llm.catalog import Problem, ProviderConfig
from app.llm.gateways.payload import (
    GatewayIn,
    GatewayInvalid,
    Plan,
    candidate_config,
    parse_gateway,
    payload_problems,
    plan_providers,
    provider_matrix,
    semantic_problems,
    served_already,
    under,
)
from app.llm.provisioning import ApplyResult, Provisioner, payload_sha256
from app.store.audit import AuditResult, utc_now
from app.store.gateways import GatewayRecord, GatewayRegistry, GatewayStatus

STATUS_EVENT = "gateway_status_changed"
METRICS_WINDOW_SECONDS = 3600
_AUDIT_SCAN = 500  # the newest audit records read for the metrics window


class GatewayNameTaken(Exception):
    pass


@dataclass(frozen=True)
class Checked:
    """A health check's outcome: the stored record and the metrics it was announced with."""

    record: GatewayRecord
    metrics: dict[str, float | int]


class _Stale(Exception):
    """The configuration changed since the gateway was created and no longer fits it."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems


class _AlreadyServing(Exception):
    """The configuration in service already holds this gateway, as it would add it: another
    worker's health check of the same gateway applied it first."""

    def __init__(self, routes: list[str]) -> None:
        self.routes = routes


@dataclass(eq=False)
class GatewayService:
    provisioner: Provisioner
    registry: GatewayRegistry

    def __post_init__(self) -> None:
        self._lock = asyncio.Lock()  # one health check at a time in this process

    def providers(self) -> list[dict[str, Any]]:
        return provider_matrix(self.provisioner.slot.current.config)

    def _check(self, raw: object) -> GatewayIn:
        """Every problem of a create payload: its shape, then what the configuration in service
        can give, then the composed configuration through the provisioning validation (which
        holds the directive policy), each with its path in the payload."""
        gateway = parse_gateway(raw)
        current = self.provisioner.slot.current.config
        problems = semantic_problems(gateway, current)
        reference = current.provider(gateway.provider_id)
        if reference is not None and not any(p.path in ("name", "(service)") for p in problems):
            # the routes with no problem of their own, composed and validated as an apply would
            sound = {
                model: route
                for model, route in gateway.model_routing.items()
                if not any(under(p.path, f"model_routing.{model}") for p in problems)
            }
            if sound:
                plan = plan_providers(
                    gateway.model_copy(update={"model_routing": sound}), reference
                )
                composed = self.provisioner.validate(candidate_config(current, plan))
                for problem in payload_problems(composed, plan, len(current.providers)):
                    if problem not in problems:
                        problems.append(problem)
        if problems:
            raise GatewayInvalid(problems)
        return gateway

    async def create(self, raw: object, actor: str) -> GatewayRecord:
        """Validated and stored `pending_validation`; nothing routes to it yet. Audited as
        `gateway_create`, refused (invalid, or the name taken) or not."""
        started = time.perf_counter()
        digest = payload_sha256(raw)
        result: AuditResult = "error"  # until known otherwise (the store may fail)
        detail = "the gateway could not be stored"
        try:
            record = await self._store(self._check(raw), actor, digest)
        except (GatewayInvalid, GatewayNameTaken) as refused:
            result, detail = "invalid", str(refused)
            raise
        else:
            result, detail = "ok", f"gateway {record.id} ({record.name}): pending_validation"
            return record
        finally:
            await self.provisioner.record(
                action="gateway_create",
                actor=actor,
                digest=digest,
                started=started,
                result=result,
                detail=detail,
            )

    async def _store(self, gateway: GatewayIn, actor: str, digest: str) -> GatewayRecord:
        now = utc_now()
        record = GatewayRecord(
            id=f"gw_{secrets.token_hex(6)}",
            name=gateway.name,
            status="pending_validation",
            created_at=now,
            updated_at=now,
            actor=actor,
            payload=gateway.model_dump(mode="json"),
            payload_sha256=digest,
        )
        if not await self.registry.create(record):
            raise GatewayNameTaken(f"a gateway named {gateway.name!r} exists")
        return record

    async def get(self, gateway_id: str) -> GatewayRecord | None:
        return await self.registry.get(gateway_id)

    async def health_check(self, gateway_id: str, actor: str) -> Checked | None:
        """Probe and, if it passes, serve: `active`, else `failed` with the reasons. A gateway
        already active is left as it is (its providers are in service)."""
        started = time.perf_counter()
        async with self._lock:
            record = await self.registry.get(gateway_id)
            if record is None:
                return None
            if record.status == "active":
                return Checked(record, await self.metrics())
            status, reasons, routes, result = await self._apply(record, actor)
            record = replace(
                record,
                status=status,
                updated_at=utc_now(),
                reasons=[{"path": p.path, "message": p.message} for p in reasons],
                routes=routes,
            )
            await self.registry.update(record)
            detail = f"gateway {record.id} ({record.name}): {status}"
            if reasons:
                detail += ": " + "; ".join(str(p) for p in reasons)
            await self.provisioner.record(
                action="gateway_health_check",
                actor=actor,
                digest=record.payload_sha256,
                started=started,
                result=result,
                detail=detail,
            )
        metrics = await self.metrics()
        self.provisioner.notify(
            STATUS_EVENT,
            {
                "gateway_id": record.id,
                "name": record.name,
                "status": record.status,
                "reasons": record.reasons,
                "payload_sha256": record.payload_sha256,
                "metrics": metrics,
            },
        )
        return Checked(record, metrics)

    async def _apply(
        self, record: GatewayRecord, actor: str
    ) -> tuple[GatewayStatus, list[Problem], list[str], AuditResult]:
        gateway = GatewayIn.model_validate(record.payload)  # validated when it was created
        planned: list[tuple[Plan, int]] = []

        def build(current: ProviderConfig) -> object:
            served = served_already(gateway, current)
            if served is not None:
                raise _AlreadyServing(served)
            problems = semantic_problems(gateway, current)
            reference = current.provider(gateway.provider_id)
            if problems or reference is None:
                raise _Stale(problems)
            plan = plan_providers(gateway, reference)
            planned.append((plan, len(current.providers)))
            return candidate_config(current, plan)

        try:
            result: ApplyResult = await self.provisioner.apply_built(build, actor)
        except _Stale as stale:
            return "failed", stale.problems, [], "invalid"
        except _AlreadyServing as already:
            return "active", [], already.routes, "ok"
        plan, first_new = planned[-1]  # the last build (again when another worker applied)
        if result.ok:
            return "active", [], plan.route_names, "ok"
        return "failed", payload_problems(result.problems, plan, first_new), [], result.outcome

    async def metrics(self) -> dict[str, float | int]:
        """The tutorial's callback metrics over the last METRICS_WINDOW_SECONDS of health checks:
        how many, the share that went active (percent), their average latency."""
        since = datetime.now(UTC) - timedelta(seconds=METRICS_WINDOW_SECONDS)
        cutoff = since.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        checks = [
            r
            for r in await self.provisioner.audit.list(_AUDIT_SCAN)
            if r.action == "gateway_health_check" and r.time >= cutoff
        ]
        total = len(checks)
        passed = sum(1 for r in checks if r.result == "ok")
        return {
            "window_seconds": METRICS_WINDOW_SECONDS,
            "total_configurations": total,
            "success_rate": round(100 * passed / total, 2) if total else 0.0,
            "avg_latency_ms": round(sum(r.latency_ms for r in checks) / total, 1) if total else 0.0,
        }
