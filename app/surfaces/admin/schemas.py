"""Wire formats of the provisioning (admin) API under /admin."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from app.http.problems import ProblemOut
from app.llm.catalog import ModelSpec, RouteSpec
from app.store.audit import AuditAction


class ValidateResponse(BaseModel):
    valid: bool
    problems: list[ProblemOut]


class UnhealthyKeyOut(BaseModel):
    """A key that failed the apply's health check while its provider served with another: the
    change went through and the router set the key aside until a re-probe succeeds."""

    provider: str
    key_id: str  # fingerprint (first 8 hex of SHA-256), as in the logs
    source: str  # `env:NAME`, `file:/path` or `literal:***`: where the key lives, never the key


class ApplyResponse(BaseModel):
    applied: bool
    sha256: str
    providers: list[str]
    routes: list[str]
    unhealthy_keys: list[UnhealthyKeyOut] = []


class KeyView(BaseModel):
    source: str  # `env:NAME`, `file:/path` or `literal:***`: where the key lives, never the key
    key_id: str  # fingerprint (first 8 hex of SHA-256), as in the logs
    healthy: bool
    cooling: bool


class ProviderView(BaseModel):
    name: str
    kind: str
    base_url: str
    timeout_seconds: float
    rpm: int | None
    tpm: int | None = None
    max_concurrent: int | None = None
    key_rotation: Literal["round_robin", "on_failure"] = "round_robin"
    circuit: Literal["closed", "open", "half_open"]
    healthy_keys: int
    keys: list[KeyView]
    models: list[ModelSpec]


class ProvidersResponse(BaseModel):
    source: Literal["applied", "providers_file", "env"]
    sha256: str
    default_model: str
    providers: list[ProviderView]
    routes: list[RouteSpec]
    # the provider file's inbound limits per tenant and key (fields left out keep the setting)
    limits: dict[str, Any] | None = None


class AuditRecordOut(BaseModel):
    id: int
    time: str
    actor: str
    action: AuditAction
    payload_sha256: str
    result: Literal["ok", "invalid", "health_check_failed", "error"]
    latency_ms: float
    detail: str


class AuditPage(BaseModel):
    records: list[AuditRecordOut]
    total: int
