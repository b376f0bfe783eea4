"""Generated requests against every operation of the service's own OpenAPI document.

schemathesis reads the document from the app object (nothing is downloaded) and calls the app
directly over ASGI, through its real lifespan, with the simulated LLM provider and CXone on
loopback. Each operation is run twice:

- with valid credentials (a client key or the admin token on the client routes, the admin token
  on /admin, CXone's Authorization value, and on the Cognigy webhook an HMAC signature, a Standard
  Webhooks signature or an API key, computed over the exact bytes sent), schema-valid and
  schema-violating input alike: no 5xx, and every status, content type, header and body is the
  one the document gives for it;
- without credentials (none, or wrong ones): every protected operation answers 401, whatever the
  body, and neither the provider nor CXone hears of it.

Half the generated chat and embeddings bodies are steered past the rules no schema can state (a
model this gateway serves, at least one user message), so generated text also reaches the whole
pipeline and the provider rather than stopping at 404 or 422.

Checks not run, and why: `positive_data_acceptance` expects every schema-valid body to be
accepted, but some rules are not expressible in the schema (the model names are configuration; a
/chat body needs a user message or a template) and the unauthenticated run is refused on purpose;
`negative_data_rejection` expects every schema-violating body to be refused, but the webhooks are
lenient on purpose (Cognigy's `intentScore: null`, CXone's enum as a name or a number, numbers as
JSON strings); stateful checks need links the document does not declare.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.auth.signatures import sign_hmac, sign_standard_webhook
from app.core.settings import Settings
from app.main import create_app
from app.simulator.cxone import CXoneSimulatorState, create_cxone_simulator
from app.simulator.faults import FaultPlan
from app.simulator.llm import create_llm_simulator
from app.simulator.server import LoopbackServer
from tests.helpers import API_KEY, CXONE_AUTH, SECRET

CLIENT_KEY = "st-client-key-4b1d9e"
ADMIN_TOKEN = "st-admin-token-77c0aa"
# reachable without a credential, on purpose (the token endpoint's credential is in its form)
PUBLIC = ("/health", "/metrics", "/api/v1/auth/token", "/oauth/token")
# Examples per operation and mode (an operation with nothing to vary stops early); a longer hunt:
# CXRELAY_FUZZ_SCALE=20 multiplies them.
SCALE = int(os.environ.get("CXRELAY_FUZZ_SCALE", "1"))
EXAMPLES = {"positive": 20 * SCALE, "negative": 12 * SCALE, "anonymous": 8 * SCALE}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _settings(llm_url: str, cxone_url: str, cxone: CXoneSimulatorState, data_dir: str) -> Settings:
    return Settings(
        _env_file=None,
        llm_gateway_base_url=llm_url,
        llm_gateway_api_key=[SecretStr("sk-schemathesis-provider-key")],
        cognigy_webhook_secret=[SecretStr(SECRET)],
        cognigy_api_keys=[SecretStr(API_KEY)],
        cxone_webhook_authorization=[SecretStr(CXONE_AUTH)],
        bot_state_secret=SecretStr("schemathesis-bot-state"),
        client_api_keys=[SecretStr(f"{CLIENT_KEY}:acme")],
        admin_token=SecretStr(ADMIN_TOKEN),
        cxone_client_id=cxone.client_id,
        cxone_client_secret=SecretStr(cxone.client_secret),
        cxone_access_key_id=cxone.access_key_id,
        cxone_access_key_secret=SecretStr(cxone.access_key_secret),
        cxone_token_url=f"{cxone_url}/auth/token",
        cxone_api_base_url=cxone_url,
        llm_retry_initial_seconds=0.01,
        llm_retry_max_seconds=0.05,
        cognigy_deadline_seconds=2.0,
        cxone_deadline_seconds=2.0,
        chat_deadline_seconds=2.0,
        data_dir=data_dir,
    )


# The document the operations are collected from; the app that answers is built per test (its
# upstreams are per-test loopback servers), from the same code, so the document is the same.
_DOCUMENT = create_app(
    _settings("http://127.0.0.1:9", "http://127.0.0.1:9", CXoneSimulatorState(), ".")
).openapi()
SCHEMA = schemathesis.openapi.from_dict(_DOCUMENT)
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
# Schema-violating input needs something to violate: a constrained body, a query or a path
# parameter (/admin/config/validate takes any document and lists its problems).
WITH_INPUT = [
    label
    for label, op in OPERATIONS.items()
    if any(body.is_negatable for body in op.body) or len(op.query) or len(op.path_parameters)
]
RUNS = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in WITH_INPUT
]


@dataclass
class Upstreams:
    llm: FaultPlan
    cxone: CXoneSimulatorState
    app: Any
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)


@pytest.fixture
def upstreams(tmp_path: Any) -> Iterator[Upstreams]:
    plan, cxone = FaultPlan(), CXoneSimulatorState()
    with (
        LoopbackServer(create_llm_simulator(plan)) as llm,
        LoopbackServer(create_cxone_simulator(cxone)) as cxone_server,
    ):
        app = create_app(_settings(llm.url, cxone_server.url, cxone, str(tmp_path)))
        yield Upstreams(plan, cxone, app)
        asgi.shutdown_lifespans()  # schemathesis started the app's lifespan: end it first


def _is_public(path: str) -> bool:
    return path.startswith(PUBLIC)


def _raw_body(case: schemathesis.Case) -> bytes:
    """The exact bytes schemathesis would send, so a signature can be computed over them."""
    sent = case.as_transport_kwargs()
    if "json" in sent:
        return json.dumps(sent["json"]).encode()
    data = sent.get("data") or b""
    return data.encode() if isinstance(data, str) else bytes(data)


def _cognigy_headers(scheme: str, raw: bytes) -> dict[str, str]:
    if scheme == "hmac":
        return {"X-Webhook-Signature": sign_hmac(SECRET, raw)}
    if scheme == "standard_webhooks":
        message_id, timestamp = f"msg_{uuid.uuid4().hex}", int(time.time())
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_standard_webhook(SECRET, message_id, timestamp, raw),
        }
    return {"X-API-Key": API_KEY}


def _credential(path: str, choice: str) -> dict[str, str]:
    if path.startswith("/webhook/cxone"):
        return {"Authorization": CXONE_AUTH}
    if path.startswith("/admin"):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    token = ADMIN_TOKEN if choice == "admin_token" else CLIENT_KEY
    return {"Authorization": f"Bearer {token}"}


# Wrong credentials of every kind the service reads; none belongs to any route.
WRONG = [
    {},
    {"Authorization": "Bearer wrong-client-key-0000"},
    {"Authorization": f"Bearer {CLIENT_KEY}x"},
    {"X-API-Key": "wrong-api-key-0000"},
    {"Authorization": "ApiKey wrong-api-key-0000"},
    {"X-Webhook-Signature": "sha256=" + "0" * 64},
    {"webhook-id": "msg_1", "webhook-timestamp": "0", "webhook-signature": "v1,AAAA"},
]


CHOICES = ["hmac", "standard_webhooks", "api_key", "client_key", "admin_token"]
SERVED_MODEL = Settings.model_fields["llm_model"].default
SERVED_EMBEDDING_MODEL = Settings.model_fields["llm_embedding_models"].get_default(
    call_default_factory=True
)[0]


def _steer(case: schemathesis.Case) -> None:
    """Past what the schema cannot say: a served model, a user message, coherent options."""
    body = case.body
    if isinstance(body, dict) and case.path == "/v1/embeddings":
        body["model"] = SERVED_EMBEDDING_MODEL
        # a few short vectors: 2048 inputs of 8192 dimensions are valid, and slow to simulate
        given = body.get("input")
        if isinstance(given, list) and given and isinstance(given[0], (str, list)):
            body["input"] = body["input"][:8]
        if isinstance(body.get("dimensions"), int):
            body["dimensions"] = min(body["dimensions"], 64)
        return
    if not isinstance(body, dict) or case.path not in ("/chat", "/v1/chat/completions"):
        return
    body.pop("fallback_models", None)
    if case.path == "/v1/chat/completions":
        body["model"] = SERVED_MODEL
    else:
        body.pop("model", None)
        if body.get("template") is None:
            body.pop("variables", None)
    body.pop("response_format", None)  # a generated JSON Schema is rarely one an answer meets
    messages = body.get("messages")
    if isinstance(messages, list) or body.get("template") is None:
        body["messages"] = [*(messages or []), {"role": "user", "content": "Where is my order?"}]


def _run(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    choices: list[Any],
    test: Callable[..., None],
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(
        case=operation.as_strategy(generation_mode=mode),
        choice=st.sampled_from(choices),
        steer=st.booleans(),
    )
    def generated(case: schemathesis.Case, choice: Any, steer: bool) -> None:
        if steer and mode is GenerationMode.POSITIVE:
            _steer(case)
        test(case, choice)

    generated()


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_with_credentials_no_5xx_and_every_response_as_documented(
    label: str, mode: GenerationMode, upstreams: Upstreams
) -> None:
    operation = OPERATIONS[label]

    def test(case: schemathesis.Case, choice: str) -> None:
        path = operation.path
        if path.startswith("/webhook/cognigy"):
            raw = _raw_body(case)
            scheme = choice if choice in ("hmac", "standard_webhooks") else "api_key"
            response = case.call(app=upstreams.app, data=raw, headers=_cognigy_headers(scheme, raw))
        elif _is_public(path):
            response = case.call(app=upstreams.app)
        else:
            response = case.call(app=upstreams.app, headers=_credential(path, choice))
        upstreams.statuses[(label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    _run(operation, mode, EXAMPLES[mode.value], CHOICES, test)
    statuses = {status for (_, status) in upstreams.statuses}
    assert statuses, "no request was sent"
    if not _is_public(operation.path):  # the credentials were good: something got past them
        assert statuses != {401}, f"{label}: every generated request was refused as unauthorized"
    _report(label, mode.value, upstreams.statuses)


@pytest.mark.parametrize("label", list(OPERATIONS))
def test_without_credentials_every_protected_operation_is_401_and_inert(
    label: str, upstreams: Upstreams
) -> None:
    operation = OPERATIONS[label]
    public = _is_public(operation.path)

    def test(case: schemathesis.Case, wrong: dict[str, str]) -> None:
        response = case.call(app=upstreams.app, headers=wrong)
        upstreams.statuses[(label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)
        if not public:
            assert response.status_code == 401, (wrong, response.status_code, response.text)
            assert response.json()["detail" if "detail" in response.json() else "error"]

    _run(operation, GenerationMode.POSITIVE, EXAMPLES["anonymous"], WRONG, test)
    if not public:
        assert upstreams.llm.requests == []  # no provider call ...
        assert upstreams.cxone.token_requests == 0  # ... and no CXone call
        assert upstreams.cxone.message_faults.requests == []
    _report(label, "anonymous", upstreams.statuses)


def _report(label: str, mode: str, statuses: Counter[tuple[str, int]]) -> None:
    """Cases sent and the statuses they got, for `pytest -s` (and the report's figures)."""
    if os.environ.get("CXRELAY_SCHEMATHESIS_REPORT"):
        spread = ", ".join(f"{status}x{n}" for (_, status), n in sorted(statuses.items()))
        print(f"\n{label} [{mode}] {sum(statuses.values())} cases: {spread}")
