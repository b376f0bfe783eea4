"""Reproducible installs: uv.lock pins every package with its hashes, matches pyproject.toml
(`make lint` runs the same check), and the dependencies that break their API between releases
carry upper bounds. Also the licence the project declares."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.slow  # uv runs as a process

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "uv.lock"
# Bounded whatever their version: each has changed its API or defaults in a release before.
ALWAYS_BOUNDED = {
    "fastapi",
    "httpx",
    "httpx-aiohttp",
    "pydantic",
    "pydantic-settings",
    "redis",
    "websockets",
    "tiktoken",
    "pyjwt",
    "bpe-openai",
}


def project() -> dict[str, Any]:
    loaded: dict[str, Any] = tomllib.loads(PYPROJECT.read_text())["project"]
    return loaded


def locked() -> dict[str, dict[str, Any]]:
    lock = tomllib.loads(LOCK.read_text())
    return {package["name"]: package for package in lock["package"]}


def uv_lock_check(directory: Path) -> subprocess.CompletedProcess[str]:
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        pytest.fail(f"uv is not installed in {uv.parent}: `make install` installs it (dev extra)")
    return subprocess.run(
        # not --offline: a stale lock is re-resolved to tell that it is stale, which needs the
        # packages' metadata, in uv's cache only where an earlier resolution put it (a fresh
        # machine's cache lacks uv's own, installed by pip); a current lock needs no network
        [str(uv), "lock", "--check"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        # make's UV_PROJECT_ENVIRONMENT and the like left out: the check reads only `directory`
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("UV_")},
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_PYTHON": sys.executable,
        },
    )


def test_the_lock_matches_pyproject() -> None:
    result = uv_lock_check(ROOT)
    assert result.returncode == 0, result.stderr


def test_a_stale_lock_is_refused(tmp_path: Path) -> None:
    """What `make lint` reports when pyproject.toml changed and uv.lock was not re-made."""
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    text = (tmp_path / "pyproject.toml").read_text()
    assert '"jsonschema>=4.18,<5"' in text
    (tmp_path / "pyproject.toml").write_text(text.replace("jsonschema>=4.18", "jsonschema>=4.19"))
    result = uv_lock_check(tmp_path)
    assert result.returncode != 0
    assert "needs to be updated" in result.stderr, result.stderr


def test_every_locked_distribution_has_a_hash() -> None:
    packages = locked()
    assert len(packages) > 50
    for name, package in packages.items():
        if package.get("source", {}).get("editable") == ".":
            continue  # the project itself
        files = [package["sdist"]] if "sdist" in package else []
        files += package.get("wheels", [])
        assert files, name
        for file in files:
            assert file["hash"].startswith("sha256:"), (name, file)


def test_every_requirement_is_in_the_lock() -> None:
    packages = locked()
    requirements = [Requirement(r) for r in project()["dependencies"]]
    for extra in project()["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    for requirement in requirements:
        name = requirement.name.lower().replace("_", "-")
        assert name in packages, name
        assert requirement.specifier.contains(packages[name]["version"]), requirement


def test_pre_1_0_and_api_breaking_dependencies_have_upper_bounds() -> None:
    packages = locked()
    for text in project()["dependencies"]:
        requirement = Requirement(text)
        name = requirement.name.lower()
        upper = [s for s in requirement.specifier if s.operator in ("<", "<=", "==", "~=")]
        if name in ALWAYS_BOUNDED or Version(packages[name]["version"]).major == 0:
            assert upper, f"{text}: needs an upper bound"


def test_the_licence_is_apache_2_0() -> None:
    assert project()["license"] == "Apache-2.0"
    assert project()["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Grant of Patent License" in text
