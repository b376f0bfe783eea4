"""Whether this process traces, from the standard OTEL_* variables, and its tracer provider.

Off by default. On when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` names an exporter; off again with
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Everything else (headers, timeout,
compression, sampler, batch sizes, resource attributes, propagators) the SDK reads itself, from
its own variables, so they mean here what they mean everywhere.

The SDK is imported by `start_tracing` only: a process with tracing off never loads it. The
lifespan calls it, so with WORKERS > 1 each worker builds its own provider (and its exporter
thread) after the fork, and shuts it down, sending what is buffered, when it stops.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

DEFAULT_SERVICE_NAME = "cx-relay"
EXPORTERS = ("otlp", "console")
DEFAULT_TRACES_ENDPOINT = "http://localhost:4318/v1/traces"
# OpenTelemetry Python's own variables for requests not to trace (comma-separated regular
# expressions, each searched in the request's URL without its query), the ASGI one first
EXCLUDED_URLS_VARIABLES = ("OTEL_PYTHON_ASGI_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS")
# when neither is set: the probes and the scrapes, which would otherwise be most of the traces
DEFAULT_EXCLUDED_URLS = "/health/live$,/health/ready$,/metrics$"


class TracingConfigError(ValueError):
    """An OTEL_* variable asks for something this service cannot do."""


@dataclass(frozen=True)
class TracingConfig:
    exporters: tuple[str, ...]
    endpoint: str | None  # where OTLP spans go (None: no OTLP exporter)


def tracing_config(environ: Mapping[str, str] | None = None) -> TracingConfig | None:
    """The tracing asked for by the environment, or None (off)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    exporters = [e for e in named if e]
    if "none" in exporters:
        return None
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not exporters:
        if not (traces_endpoint or endpoint):
            return None
        exporters = ["otlp"]
    unknown = sorted(set(exporters) - set(EXPORTERS))
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={','.join(unknown)} is not supported: use otlp (OTLP over "
            "HTTP/protobuf), console, or none"
        )
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", ""
    )
    protocol = protocol.strip()
    if "otlp" in exporters and protocol not in ("", "http/protobuf"):
        raise TracingConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: this service sends OTLP "
            "over HTTP/protobuf (port 4318 on a collector); unset it or set http/protobuf"
        )
    if "otlp" not in exporters:
        return TracingConfig(tuple(dict.fromkeys(exporters)), None)
    if not traces_endpoint:  # the SDK's own rule: the base endpoint plus the signal's path
        traces_endpoint = f"{endpoint.rstrip('/')}/v1/traces" if endpoint else ""
    return TracingConfig(
        tuple(dict.fromkeys(exporters)), traces_endpoint or DEFAULT_TRACES_ENDPOINT
    )


def excluded_urls(environ: Mapping[str, str] | None = None) -> re.Pattern[str] | None:
    """What requests go untraced, or None (every one is traced: a variable set to "")."""
    env = os.environ if environ is None else environ
    name = next((n for n in EXCLUDED_URLS_VARIABLES if n in env), None)
    value = DEFAULT_EXCLUDED_URLS if name is None else env[name]
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    if not patterns:
        return None
    try:
        return re.compile("|".join(f"(?:{p})" for p in patterns))
    except re.error as error:
        raise TracingConfigError(
            f"{name} is not a comma-separated list of regular expressions: {error}"
        ) from None


def start_tracing(config: TracingConfig, service_version: str) -> TracerProvider:
    """A tracer provider exporting in batches as `config` says (not the process's global one:
    the service hands its tracer to app.observability.tracing itself)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({SERVICE_VERSION: service_version})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names it
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER(_ARG)
    for exporter in config.exporters:
        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # endpoint, headers, timeout, compression, certificates: OTEL_EXPORTER_OTLP_*
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider
