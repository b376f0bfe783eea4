"""The deployment files agree with each other and with the code: the compose stack, Prometheus'
scrape configuration, Grafana's provisioning, and a dashboard whose queries name only metrics the
service exports (read from the collectors, so a renamed metric fails here, not on a blank panel).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import app.services.metrics  # noqa: F401  (registers the collectors)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
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
