"""Done when: the service as its users run it (`python -m app serve`), with
OTEL_EXPORTER_OTLP_ENDPOINT pointing at a collector stand-in, answers one signed Cognigy turn and
the collector receives that turn's span tree over OTLP/HTTP (protobuf) — sent when the service
stops (SIGTERM), as the batch is not due before then. With WORKERS=2 each worker sends its own."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from app.simulator.cxone import CXoneSimulatorState
from app.simulator.faults import Fault, FaultPlan
from app.simulator.server import LoopbackServer
from tests.helpers import SECRET, WEBHOOK, free_port, running_service, signed, trigger

pytestmark = pytest.mark.slow  # starts the service

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
COLLECTOR_TOKEN = "collector-t0ken"
DECISION = {
    "classified_intent": "billing_question",
    "confidence": 0.83,
    "extracted_parameters": {},
    "suggested_response": "I can look into that for you.",
    "requires_human_agent": False,
}


@dataclass
class Collector:
    """What an OpenTelemetry collector's OTLP/HTTP receiver would have received."""

    url: str
    exports: list[ExportTraceServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def spans(self) -> list[tuple[dict[str, Any], Span]]:
        """Every span received, with its resource's attributes."""
        return [
            (_attributes(resource_spans.resource.attributes), span)
            for export in self.exports
            for resource_spans in export.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


def _attributes(values: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in values:
        assert isinstance(item, KeyValue)
        kind = item.value.WhichOneof("value")
        found[item.key] = getattr(item.value, kind) if kind else None
    return found


@contextmanager
def collector() -> Iterator[Collector]:
    """A loopback OTLP/HTTP receiver: POST /v1/traces, ExportTraceServiceRequest in protobuf."""
    port = free_port()
    received = Collector(f"http://127.0.0.1:{port}")

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
            received.exports.append(export)
            received.headers.append({k.lower(): v for k, v in self.headers.items()})
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def service_settings(
    llm: LoopbackServer, cxone: LoopbackServer, state: CXoneSimulatorState, otlp: Collector
) -> dict[str, str]:
    return {
        "COGNIGY_WEBHOOK_SECRET": SECRET,
        "LLM_GATEWAY_BASE_URL": llm.url,
        "LLM_GATEWAY_API_KEY": "sk-test-provider-key",
        "CXONE_CLIENT_ID": state.client_id,
        "CXONE_CLIENT_SECRET": state.client_secret,
        "CXONE_ACCESS_KEY_ID": state.access_key_id,
        "CXONE_ACCESS_KEY_SECRET": state.access_key_secret,
        "CXONE_TOKEN_URL": f"{cxone.url}/auth/token",
        "CXONE_API_BASE_URL": cxone.url,
        # the standard variables, read by the OpenTelemetry SDK itself
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-collector-token={COLLECTOR_TOKEN}",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing is sent before the service stops
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "process",  # process.pid: which worker sent it
    }


def signed_turn(base_url: str, conversation: str = "contact-42") -> httpx.Response:
    raw, headers = signed(trigger(conversationId=conversation))
    headers["traceparent"] = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    return httpx.post(base_url + WEBHOOK, content=raw, headers=headers, timeout=30)


def started_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line.get("message") == "cx-relay started"]


def test_one_signed_cognigy_turn_reaches_the_collector_as_its_span_tree(
    tmp_path: Path,
    llm_plan: FaultPlan,
    llm_server: LoopbackServer,
    cxone_server: LoopbackServer,
    cxone_state: CXoneSimulatorState,
) -> None:
    llm_plan.push(Fault(content=json.dumps(DECISION)))
    with collector() as otlp:
        env = service_settings(llm_server, cxone_server, cxone_state, otlp)
        with running_service(tmp_path, **env) as service:
            response = signed_turn(service.url)
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "success"
            assert otlp.exports == []  # still in the batch
        # stopped (SIGTERM): the lifespan's shutdown sent the batch
        (started,) = started_lines(service.logs())
        spans = otlp.spans()

    assert started["tracing"] == {
        "on": True,
        "exporters": ["otlp"],
        "endpoint": f"{otlp.url}/v1/traces",
    }
    assert spans, service.log_path.read_text()
    assert all(h["content-type"] == "application/x-protobuf" for h in otlp.headers)
    assert all(h["x-collector-token"] == COLLECTOR_TOKEN for h in otlp.headers)
    assert {resource["service.name"] for resource, _ in spans} == {"cx-relay"}
    assert {resource["process.pid"] for resource, _ in spans} == {started["pid"]}

    by_id = {span.span_id: span for _, span in spans}
    server = [s for s in by_id.values() if s.kind == Span.SpanKind.SPAN_KIND_SERVER]
    # the start-up polls of /health/live are not traced (OTEL_PYTHON_EXCLUDED_URLS' default)
    assert {s.name for s in server} == {"POST /webhook/cognigy/fallback"}
    (request,) = [s for s in server if s.name == "POST /webhook/cognigy/fallback"]
    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id.hex() == CALLER_SPAN
    assert _attributes(request.attributes)["http.response.status_code"] == 200

    def root_of(span: Span) -> Span:
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
        return span

    below = [s for s in by_id.values() if s is not request and root_of(s) is request]
    names = {s.name for s in below}
    for step in ("cxone.history", "llm.attempt", "budget.reserve", "ledger.commit"):
        assert step in names, names
    assert "safety.injection" in names  # the guard of a Cognigy turn: its input
    (attempt,) = [s for s in below if s.name == "llm.attempt"]
    assert _attributes(attempt.attributes)["cxrelay.llm.outcome"] == "ok"
    assert llm_plan.requests[0]["headers"]["traceparent"].split("-")[1:3] == [
        TRACE_ID,
        attempt.span_id.hex(),
    ]


def test_with_two_workers_each_worker_traces_after_the_fork(
    tmp_path: Path,
    llm_plan: FaultPlan,
    llm_server: LoopbackServer,
    cxone_server: LoopbackServer,
    cxone_state: CXoneSimulatorState,
) -> None:
    turns = 12
    for _ in range(turns):
        llm_plan.push(Fault(content=json.dumps(DECISION)))
    with collector() as otlp:
        env = service_settings(llm_server, cxone_server, cxone_state, otlp)
        secret = "0123456789abcdef0123456789abcdef"
        with running_service(tmp_path, WORKERS="2", SESSION_ID_SECRET=secret, **env) as service:
            for n in range(turns):  # a new connection each: the kernel spreads them
                assert signed_turn(service.url, f"contact-{n}").status_code == 200
        workers = {line["pid"] for line in started_lines(service.logs())}
        spans = otlp.spans()

    assert len(workers) == 2
    requests = [s for _, s in spans if s.name == "POST /webhook/cognigy/fallback"]
    assert len(requests) == turns  # none lost: every worker flushed its own batch
    senders = {resource["process.pid"] for resource, _ in spans}
    assert senders <= workers  # never the parent: it set up no SDK
