"""Which OTEL_* settings turn tracing on, and what the tracer provider built from them does."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from app.observability.tracing_setup import (
    DEFAULT_TRACES_ENDPOINT,
    TracingConfig,
    TracingConfigError,
    excluded_urls,
    start_tracing,
    tracing_config,
)


def test_off_when_nothing_asks_for_it() -> None:
    assert tracing_config({}) is None
    assert tracing_config({"OTEL_SERVICE_NAME": "relay-eu"}) is None  # naming is not asking


def test_an_otlp_endpoint_turns_it_on_with_the_sdks_traces_path() -> None:
    assert tracing_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}) == (
        TracingConfig(("otlp",), "http://collector:4318/v1/traces")
    )
    signal = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otel.example/custom"}
    assert tracing_config(signal) == TracingConfig(("otlp",), "https://otel.example/custom")


def test_the_exporter_variable_turns_it_on_and_off() -> None:
    assert tracing_config({"OTEL_TRACES_EXPORTER": "otlp"}) == TracingConfig(
        ("otlp",), DEFAULT_TRACES_ENDPOINT
    )
    assert tracing_config({"OTEL_TRACES_EXPORTER": "console"}) == TracingConfig(("console",), None)
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing_config({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_config({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing_config({**endpoint, "OTEL_SDK_DISABLED": "false"}) is not None


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER=zipkin is not supported"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported",
        ),
    ],
)
def test_what_cannot_be_done_is_refused_with_what_to_set(
    environ: dict[str, str], says: str
) -> None:
    with pytest.raises(TracingConfigError, match=says):
        tracing_config(environ)


def test_the_provider_reads_the_sdks_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = start_tracing(TracingConfig(("otlp",), None), "1.2.3")
    try:
        assert provider.resource.attributes["service.name"] == "cx-relay"
        assert provider.resource.attributes["service.version"] == "1.2.3"
        assert isinstance(provider.sampler, ParentBasedTraceIdRatio)
        (processor,) = provider._active_span_processor._span_processors
        assert isinstance(processor, BatchSpanProcessor)
        exporter = processor._batch_processor._exporter
        assert isinstance(exporter, OTLPSpanExporter)
        # where it sends and with which headers: tests/observability/test_tracing_service.py
    finally:
        provider.shutdown()


def test_the_service_name_is_the_operators_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "relay-eu")
    provider = start_tracing(TracingConfig(("console",), None), "1.2.3")
    try:
        assert provider.resource.attributes["service.name"] == "relay-eu"
    finally:
        provider.shutdown()


def test_the_excluded_urls_are_opentelemetrys_variables_with_probes_by_default() -> None:
    default = excluded_urls({})
    assert default is not None
    assert default.search("http://relay:8080/health/live")
    assert default.search("http://relay:8080/metrics")
    assert not default.search("http://relay:8080/health")
    assert not default.search("http://relay:8080/webhook/cognigy/fallback")
    assert excluded_urls({"OTEL_PYTHON_EXCLUDED_URLS": ""}) is None
    asgi_first = excluded_urls(
        {"OTEL_PYTHON_ASGI_EXCLUDED_URLS": "webhook", "OTEL_PYTHON_EXCLUDED_URLS": "metrics"}
    )
    assert asgi_first is not None and asgi_first.search("http://relay/webhook/cxone")
    assert not asgi_first.search("http://relay/metrics")
    with pytest.raises(TracingConfigError, match="OTEL_PYTHON_EXCLUDED_URLS is not a comma"):
        excluded_urls({"OTEL_PYTHON_EXCLUDED_URLS": "health,(unclosed"})
