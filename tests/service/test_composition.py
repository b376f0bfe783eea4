"""The app module builds the service and nothing else: the simulators belong to the command that
asks for them (`serve --simulate`), and every shared part is built once, by the lifespan."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import service_env


def test_the_app_module_never_loads_the_simulator(tmp_path: Path) -> None:
    """In a fresh interpreter (this one has the simulators loaded by conftest): importing
    app.main and building an app, simulated settings and all, imports no app.simulator module."""
    script = textwrap.dedent(
        """
        import sys
        import app.main
        app.main.create_app()
        print(",".join(m for m in sys.modules if m.split(".")[:2] == ["app", "simulator"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # no .env
        env=service_env(SIMULATE="true"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
