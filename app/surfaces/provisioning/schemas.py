"""Wire formats of the provisioning tutorial's API (seed 002) under /api/v2."""

from __future__ import annotations

from pydantic import BaseModel

from app.http.problems import ProblemOut
from app.store.gateways import GatewayRecord, GatewayStatus


class ModelEndpointOut(BaseModel):
    model_id: str
    endpoint_url: str
    max_tokens: int
    max_context_tokens: int


class ProviderOut(BaseModel):
    id: str
    name: str
    engine: str
    models: list[ModelEndpointOut]
    rate_limit_per_minute: int


class GatewayCreated(BaseModel):
    id: str
    name: str
    status: GatewayStatus
    created_at: str
    health_check_url: str

    @classmethod
    def of(cls, record: GatewayRecord) -> GatewayCreated:
        return cls(
            id=record.id,
            name=record.name,
            status=record.status,
            created_at=record.created_at,
            health_check_url=health_check_url(record.id),
        )


class GatewayView(GatewayCreated):
    updated_at: str
    provider_id: str
    payload_sha256: str
    reasons: list[ProblemOut]  # why it failed its health check (empty otherwise)
    models: list[str]  # once active: the model names that reach it, `<gateway name>/<model>`

    @classmethod
    def of(cls, record: GatewayRecord) -> GatewayView:
        return cls(
            **GatewayCreated.of(record).model_dump(),
            updated_at=record.updated_at,
            provider_id=str(record.payload.get("provider_id", "")),
            payload_sha256=record.payload_sha256,
            reasons=[ProblemOut(**r) for r in record.reasons],
            models=record.routes,
        )


class GatewayMetrics(BaseModel):
    """The tutorial's callback metrics, over the last `window_seconds` of health checks."""

    window_seconds: int
    total_configurations: int
    success_rate: float  # percent of those health checks that made their gateway active
    avg_latency_ms: float


class HealthCheckView(GatewayView):
    metrics: GatewayMetrics


def health_check_url(gateway_id: str) -> str:
    return f"/api/v2/gateways/{gateway_id}/health-check"
