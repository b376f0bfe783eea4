"""`make reliability`: the fast fault-injection suite, the crash suite, the soak, then the report.

    .venv/bin/python -m reliability.run              # the whole thing (~12 min: a 10-min soak)
    .venv/bin/python -m reliability.run --quick      # ~3 min: 3 kills, a 60 s soak
    .venv/bin/python -m reliability.run --only soak --seconds 1800 --rate 50

Each part writes its JSON to reliability/results/ (fast.json by the pytest suite in
tests/reliability/ through CXRELAY_RELIABILITY_REPORT, crash.json, soak.json, run.json) and
reliability/report.py renders docs/RELIABILITY.md from them, so a part run alone updates its
rows and keeps the others' from their last run. Exit status 1 if any part failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reliability import crash, report, soak
from reliability.harness import ROOT, log

RESULTS = ROOT / "reliability" / "results"
FAST_SUITE = ROOT / "tests" / "reliability"
REPORT_ENV = "CXRELAY_RELIABILITY_REPORT"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def fast() -> dict[str, Any]:
    """The pytest fault-injection suite; it writes its own scenario list to fast.json."""
    if not FAST_SUITE.is_dir():
        log(f"fast suite: {FAST_SUITE.relative_to(ROOT)} does not exist yet, skipped")
        return {"ran": False, "ok": True, "reason": "tests/reliability/ does not exist"}
    out = RESULTS / "fast.json"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    env = {**os.environ, REPORT_ENV: str(out)}
    junit = RESULTS / "fast-junit.xml"  # every test's outcome and time, for the report
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(FAST_SUITE)]
    command.append(f"--junitxml={junit}")
    log("fast suite: " + " ".join(command[2:]))
    status = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    seconds = round(time.monotonic() - started, 1)
    where = "in" if out.exists() else "NOT in"
    log(f"fast suite: exit {status} in {seconds}s; scenarios {where} {out}")
    return {"ran": True, "ok": status == 0, "exit_status": status, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 kills and a 60 s soak")
    parser.add_argument("--seconds", type=float, help="soak length (default 600, --quick 60)")
    parser.add_argument("--rate", type=float, default=30.0, help="soak requests/s (default 30)")
    parser.add_argument("--rounds", type=int, help="SIGKILLs on SQLite (default 5, --quick 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="crash suite clients")
    parser.add_argument("--seed", type=int, help="random seed (kill moments, traffic mix)")
    parser.add_argument("--only", choices=["fast", "crash", "soak", "report"], action="append")
    args = parser.parse_args(argv)
    parts = args.only or ["fast", "crash", "soak"]
    seconds = args.seconds or (60.0 if args.quick else 600.0)
    rounds = args.rounds or (3 if args.quick else 5)

    started = time.monotonic()
    # a part run alone keeps the other parts' figures from their last run
    previous = RESULTS / "run.json"
    run: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    run.setdefault("seconds", {})
    run.setdefault("ok", {})
    run.setdefault("finished", {})
    run["machine"] = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    run["quick"] = args.quick

    def fast_part() -> bool:
        run["fast"] = fast()
        return bool(run["fast"]["ok"])

    def crash_part() -> bool:
        results = crash.run(rounds, args.concurrency, args.seed)
        write("crash.json", results)
        return all(r["ok"] for r in results)

    def soak_part() -> bool:
        result = soak.run(seconds, args.rate, args.seed)
        write("soak.json", result)
        return bool(result["ok"])

    for part, work in (("fast", fast_part), ("crash", crash_part), ("soak", soak_part)):
        if part in parts:
            t = time.monotonic()
            run["ok"][part] = work()
            run["seconds"][part] = round(time.monotonic() - t, 1)
            run["finished"][part] = now()
    if parts == ["fast", "crash", "soak"]:
        run["seconds"]["total"] = round(time.monotonic() - started, 1)
    if parts != ["report"]:
        write("run.json", run)
    path = report.write()
    log(f"report: {path.relative_to(ROOT)}")
    failed = [part for part in parts if not run["ok"].get(part, True)]
    took = time.monotonic() - started
    log(f"done in {took:.0f}s: " + (f"FAILED {failed}" if failed else "all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
