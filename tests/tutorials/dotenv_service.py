"""The webhook tutorials' reader's set-up: an `.env` in a directory, `python -m app serve` started
there (reading it, as the service does from its working directory), and what the simulated
provider was asked."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.simulator.faults import FaultPlan
from tests.helpers import ServiceProcess, running_service, service_env


def write_env(home: Path, lines: list[str]) -> None:
    (home / ".env").write_text("\n".join(lines) + "\n", encoding="utf-8")


@contextmanager
def serving(home: Path, lines: list[str]) -> Iterator[ServiceProcess]:
    """The service started from an `.env` of these lines (no --simulate), once it is live."""
    write_env(home, lines)
    with running_service(home) as service:
        yield service


def refused_start(home: Path, lines: list[str]) -> subprocess.CompletedProcess[str]:
    """`python -m app serve` from an `.env` of these lines that should stop start-up."""
    write_env(home, lines)
    return subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=home,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def chat_calls(plan: FaultPlan) -> list[dict[str, Any]]:
    """The chat completions the simulated provider received (not its /v1/models probes)."""
    return [r for r in plan.requests if isinstance(r.get("body"), dict) and "messages" in r["body"]]
