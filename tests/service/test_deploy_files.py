"""The deployment files agree with each other and with the code: the compose stack, Prometheus'
scrape configuration, Grafana's provisioning, and a dashboard whose queries name only metrics the
service exports (read from the collectors, so a renamed metric fails here, not on a blank panel).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY

import app.observability.metrics  # noqa: F401  (registers the collectors)
from tests.helpers import free_port, readme_samples, service_env
from tests.observability.test_metrics_multiprocess import counts_by_process, wait_until_both_live
from tests.store.test_store import redis_prefix

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
BOT_STATE_REJECTED = "cxrelay_bot_state_rejected_total"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cx-relay.json"

METRIC_NAME = re.compile(r"\bcxrelay_[a-z0-9_]+")
# What the dashboard must show (the operations issue's list).
REQUIRED_ON_DASHBOARD = {
    "cxrelay_requests_total",
    "cxrelay_request_latency_seconds_bucket",
    "cxrelay_upstream_latency_seconds_bucket",
    "cxrelay_time_to_first_token_seconds_bucket",
    "cxrelay_tokens_total",
    "cxrelay_cost_usd_total",
    "cxrelay_cache_lookups_total",
    "cxrelay_budget_exhausted_total",
    "cxrelay_provider_keys_healthy",
    "cxrelay_provider_circuit_state",
    "cxrelay_llm_retries_total",
    "cxrelay_llm_fallbacks_total",
    "cxrelay_llm_attempts_total",
    "cxrelay_safety_events_total",
    "cxrelay_prompt_injection_total",
}


def exported_names() -> set[str]:
    """Every sample name the service's collectors can export (a labelled collector with no child
    yet still describes its family, so the names are known before anything is counted)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("cxrelay_"):
            continue
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update(f"{family.name}{suffix}" for suffix in ("", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return queries


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_compose_runs_the_service_its_upstreams_and_monitoring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"cx-relay", "redis", "simulator", "prometheus", "grafana"} <= set(services)
    ports = {name: service.get("ports", []) for name, service in services.items()}
    assert "8080:8080" in ports["cx-relay"]
    assert "9090:9090" in ports["prometheus"]
    assert "3000:3000" in ports["grafana"]
    relay_env = services["cx-relay"]["environment"]
    assert str(relay_env["WORKERS"]) in ("2", "${WORKERS:-2}")
    multiproc_dir = relay_env["PROMETHEUS_MULTIPROC_DIR"]
    assert any(str(t).split(":")[0] == multiproc_dir for t in services["cx-relay"]["tmpfs"])


def test_compose_sets_the_credentials_the_readme_samples_send(compose: dict[str, Any]) -> None:
    """So the README's Cognigy and CXone samples work against the stack as written; each can be
    replaced from the shell or a `.env` beside the compose file."""
    relay_env = compose["services"]["cx-relay"]["environment"]
    samples = readme_samples()
    assert compose_value(relay_env["COGNIGY_WEBHOOK_SECRET"]) == samples.cognigy_secret
    assert compose_value(relay_env["CXONE_WEBHOOK_AUTHORIZATION"]) == samples.cxone_authorization
    for name in ("COGNIGY_WEBHOOK_SECRET", "CXONE_WEBHOOK_AUTHORIZATION", "BOT_STATE_SECRET"):
        assert str(relay_env[name]).startswith(f"${{{name}:-"), name
        assert compose_value(relay_env[name]), name


def test_compose_mounts_files_that_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source}"
    grafana_env = compose["services"]["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "${GRAFANA_ADMIN_PASSWORD" in grafana_env["GF_SECURITY_ADMIN_PASSWORD"]


def test_prometheus_scrapes_the_service_every_5_seconds() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["cx-relay"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["cx-relay:8080"]


def test_grafana_provisions_the_datasource_and_the_dashboard(
    compose: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "cx-relay.yml").read_text())
    (provider,) = providers["providers"]
    mounts = dict(
        v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith(".")
    )
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    # every panel and query asks the provisioned datasource, by its uid
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "cx-relay" and dashboard["title"] == "cx-relay"
    assert dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


def test_dashboard_queries_name_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_names()
    named = {name for query in dashboard_queries(dashboard) for name in METRIC_NAME.findall(query)}
    unknown = sorted(named - exported)
    assert not unknown, f"the dashboard queries metrics the service does not export: {unknown}"
    assert not sorted(REQUIRED_ON_DASHBOARD - named), "a required metric has no panel"


# --- the compose stack, run without Docker ------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"
CONVERSATION_TURNS = 12
# `${NAME:-default}` / `${NAME-default}` (compose's default when NAME is unset), or `$$`
COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{\w+:?-([^}]*)\}")
REDIS_ON_LOOPBACK = "127.0.0.1:6379"  # stands in for compose's redis: the real local Redis


def compose_value(value: object) -> str:
    """A setting as compose hands it to the container when neither the shell nor a `.env` sets
    its variables: the stack run as written, with its own settings."""
    text = COMPOSE_VARIABLE.sub(lambda m: "$" if m.group(0) == "$$" else m.group(1), str(value))
    assert "${" not in text, f"a variable without a default: {value}"
    return text


@dataclass(frozen=True)
class Image:
    """What the Dockerfile's final stage runs: its ENV, WORKDIR and CMD."""

    env: dict[str, str]
    workdir: str
    command: list[str]


def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, rest), continuation lines joined (HEALTHCHECK's
    own CMD stays in its HEALTHCHECK)."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DOCKERFILE.read_text() if text is None else text).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def final_stage() -> Image:
    """What the last stage sets and runs."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    env: dict[str, str] = {}
    workdir, command = "/", []
    for keyword, rest in instructions[last_from:]:
        if keyword == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
        elif keyword == "WORKDIR":
            workdir = rest
        elif keyword == "CMD":
            command = json.loads(rest)
    return Image(env, workdir, command)


def healthcheck() -> list[str]:
    """The final stage's HEALTHCHECK command: exec form (a JSON array of strings), no shell."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    (rest,) = [rest for keyword, rest in instructions[last_from:] if keyword == "HEALTHCHECK"]
    options, separator, command = rest.partition(" CMD ")
    assert separator and "--timeout=" in options, rest
    parsed = json.loads(command)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), rest
    return [sys.executable if a == "python" else a for a in parsed]


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The image's health check as Docker runs it: the image's PORT in the environment."""
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run(healthcheck(), env=env, capture_output=True, text=True, timeout=10)


@contextmanager
def running(
    command: list[str], cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A process for the length of the block; SIGTERM at the end (killed if it lingers)."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)


def wait_for_health(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling interval only; nothing asserts on timing
    pytest.fail(f"{url} not healthy within 60 s: {log.read_text()[-3000:]}")


@dataclass(frozen=True)
class Stack:
    url: str
    metrics_dir: Path


@pytest.fixture
async def compose_stack(compose: dict[str, Any], tmp_path: Path) -> AsyncIterator[Stack]:
    """The cx-relay service as compose runs it, without Docker: the image's CMD with the image's
    ENV and then compose's environment; compose's hostnames replaced by a `python -m app
    simulator` on a free port (compose's own simulator command) and the local Redis under a
    prefix of this test; the container's port, data volume and tmpfs by a free port and
    temporary directories. Its WORKERS stay as compose sets them."""
    services = compose["services"]
    relay = services["cx-relay"]
    assert "command" not in relay and relay["build"] == services["simulator"]["build"]
    image = final_stage()
    assert image.workdir == image.env["DATA_DIR"]  # the image starts in its data directory

    simulator_port = free_port()
    simulator = [sys.executable if a == "python" else a for a in services["simulator"]["command"]]
    compose_port = simulator[simulator.index("--port") + 1]
    simulator[simulator.index("--host") + 1] = "127.0.0.1"
    simulator[simulator.index("--port") + 1] = str(simulator_port)
    hosts = {
        f"simulator:{compose_port}": f"127.0.0.1:{simulator_port}",
        "redis:6379": REDIS_ON_LOOPBACK,
    }
    tmpfs = {str(entry).split(":", 1)[0] for entry in relay.get("tmpfs", [])}
    metrics_dir = tmp_path / "tmpfs"
    metrics_dir.mkdir()
    settings: dict[str, str] = {}
    for name, raw in relay["environment"].items():
        value = compose_value(raw)
        for host, stand_in in hosts.items():
            value = value.replace(f"//{host}", f"//{stand_in}")
        assert not any(f"//{other}:" in value for other in services), f"{name}={value}"
        settings[name] = str(metrics_dir) if value in tmpfs else value
    assert settings["WORKERS"] == "2"
    assert settings["PROMETHEUS_MULTIPROC_DIR"] == str(metrics_dir)

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    async with redis_prefix() as prefix:
        env = service_env(
            **{
                **{k: v for k, v in image.env.items() if k != "PATH"},
                **settings,  # compose's environment overrides the image's
                "HOST": "127.0.0.1",  # the image's 0.0.0.0 would listen beyond the loopback
                "PORT": str(port),
                "DATA_DIR": str(data_dir),
                "REDIS_KEY_PREFIX": prefix,
            }
        )
        command = [sys.executable if a == "python" else a for a in image.command]
        sim_log = tmp_path / "simulator.log"
        with running(simulator, tmp_path, service_env(), sim_log) as sim:
            wait_for_health(f"http://127.0.0.1:{simulator_port}/health", sim, sim_log)
            log = tmp_path / "cx-relay.log"
            with running(command, data_dir, env, log) as process:
                url = f"http://127.0.0.1:{port}"
                wait_until_both_live(url, process, log)
                yield Stack(url, metrics_dir)
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=30) == 0, log.read_text()[-3000:]


def turns_by_process(metrics_dir: Path) -> dict[int, float]:
    """Each worker's count of CXone turns (counted before the answer is sent)."""
    return counts_by_process(metrics_dir, "cxrelay_turns_total", surface="cxone")


@pytest.mark.slow
async def test_the_compose_stack_carries_a_cxone_conversation_as_one_session(
    compose_stack: Stack,
) -> None:
    """The README's CXone sample, then each answer's botSessionState sent with the next turn,
    every turn on a new connection so that either worker may take it: one session throughout,
    no state rejected, and both workers served turns of it."""
    samples = readme_samples()
    headers = {"Authorization": samples.cxone_authorization}
    limits = httpx.Limits(max_keepalive_connections=0)
    sessions: list[str] = []
    served_by: list[int] = []
    state: Any = None
    async with httpx.AsyncClient(base_url=compose_stack.url, limits=limits, timeout=30) as client:
        for n in range(CONVERSATION_TURNS):
            body = dict(samples.cxone_body, botSessionState=state)
            if n:
                body["userInput"] = f"Thanks. And question {n}: when will the refund arrive?"
            before = turns_by_process(compose_stack.metrics_dir)
            response = await client.post("/webhook/cxone", json=body, headers=headers)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["branchName"] == "PromptAndCollectNextResponse", answer
            assert "errorDetails" not in answer, answer
            sessions.append(answer["intentInfo"]["context"])
            state = answer["botSessionState"]
            assert state["state"]["turns"] == n + 1, (n, state)
            after = turns_by_process(compose_stack.metrics_dir)
            (pid,) = [p for p, count in after.items() if count > before.get(p, 0.0)]
            served_by.append(pid)
        metrics = (await client.get("/metrics")).text

    assert len(set(sessions)) == 1, sessions
    rejected = [line for line in metrics.splitlines() if line.startswith(BOT_STATE_REJECTED)]
    assert all(float(line.rsplit(" ", 1)[1]) == 0 for line in rejected), rejected
    cxone_turns = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("cxrelay_turns_total{") and 'surface="cxone"' in line
    ]
    assert sum(cxone_turns) == CONVERSATION_TURNS  # the scrape adds up both workers
    assert len(set(served_by)) == 2, f"one worker served every turn: {served_by}"
    # and the image's exec-form HEALTHCHECK passes against the service as compose runs it
    port = urlsplit(compose_stack.url).port
    assert port is not None
    check = run_healthcheck(port)
    assert check.returncode == 0, check.stderr
