"""The sections of docs/RELIABILITY.md past its summary table (reliability/report.py): the crash
rounds, the soak's resources per minute, the fast suite's deadlines; and the Markdown helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.etree import ElementTree


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def verdict(ok: Any) -> str:
    return "pass" if ok else "**FAIL**"


def crash_section(crash: Any) -> list[str]:
    if not crash:
        return ["*The crash suite has not run yet.*", ""]
    out: list[str] = []
    for c in crash:
        if c["name"] == "sqlite_kill":
            out += [
                f"### SIGKILL under load, SQLite (seed {c.get('seed')})",
                "",
                "Each round: 32 clients, each request its own session; SIGKILL at a random "
                "moment; restart on the same DATA_DIR; everything the clients saw so far "
                "checked against the SQLite file. *Cut* = requests whose connection the kill "
                "broke; *recorded, unanswered* = of those, the ones whose record was already "
                "committed (the answer was on its way); *open holds* = reservations of the "
                "killed calls, given back after the TTL.",
                "",
            ]
            rows = [
                [
                    r["round"],
                    r["killed_after_s"],
                    r["restart_s"],
                    r["turns_sent"],
                    r["answered"],
                    r["cut_by_kill"],
                    r["records"],
                    r["lost_records"],
                    r["duplicated_records"],
                    r["recorded_unanswered"],
                    r["budget_mismatches"],
                    r["open_reservations"],
                    verdict(not r["problems"]),
                ]
                for r in c.get("rounds", [])
            ]
            out += table(
                [
                    "round",
                    "killed at (s)",
                    "restart (s)",
                    "sent",
                    "answered",
                    "cut",
                    "records (total)",
                    "lost",
                    "duplicated",
                    "recorded, unanswered",
                    "budget ≠ ledger",
                    "open holds",
                    "result",
                ],
                rows,
            )
            out += [
                "",
                f"After the last round: SIGTERM exit status {fmt(c.get('sigterm_exit'))}; once "
                f"the reservation TTL had passed, {fmt(c.get('open_reservations'))} reservations "
                f"were still held; {fmt(c.get('mismatched_records'))} records differed from the "
                f"usage their answer reported; {fmt(c.get('cached_records'))} records were "
                "intent-cache hits (no reservation, zero tokens).",
                "",
            ]
        else:
            out += [
                f"### Two replicas on one Redis, one SIGKILLed (seed {c.get('seed')})",
                "",
                f"Half the requests share one session per half-second, sent to both replicas "
                f"at once, so they race for its {fmt(c.get('session_limit'))}-token budget all "
                f"along; replica a was SIGKILLed at {fmt(c.get('killed_after_s'))} s (its "
                f"clients moved to replica b) and restarted in {fmt(c.get('restart_s'))} s.",
                "",
            ]
            out += table(
                ["figure", "value"],
                [
                    ["turns sent / answered", f"{c['turns_sent']:,} / {c['answered']:,}"],
                    ["refused (429) / webhook fallbacks", f"{c['refused']:,} / {c['fallbacks']:,}"],
                    ["cut by the kill", c.get("cut_on_killed_replica")],
                    ["records", c.get("records")],
                    [
                        "lost / duplicated records",
                        f"{c['lost_records']} / {c['duplicated_records']}",
                    ],
                    ["budget counters ≠ ledger", c.get("budget_mismatches")],
                    [
                        "most tokens any session used (limit)",
                        f"{c['max_session_used']:,} ({c['session_limit']:,})",
                    ],
                    ["sessions over their limit (bound: 0)", c.get("overspent_scopes")],
                    ["reservations left held by the killed replica", c.get("open_reservations")],
                    ["SIGTERM exit statuses", " ".join(map(str, c.get("sigterm_exits", [])))],
                ],
            )
            out.append("")
        if c.get("problems"):
            out += ["Problems:", ""] + [f"- {p}" for p in c["problems"][:10]] + [""]
    return out


def soak_section(soak: Any) -> list[str]:
    if not isinstance(soak, dict):
        return ["*The soak has not run yet.*", ""]
    rss, crit = soak["rss_mib"], soak["criteria"]
    out = [
        f"{soak['seconds']:g} s at {soak['rate']:g} requests/s (seed {soak.get('seed')}), "
        f"warm-up {soak['warm_up_s']:g} s. {soak['turns_sent']:,} turns, "
        f"{soak['answered']:,} answered ({soak['cached']:,} from the intent cache), "
        f"errors: {soak['errors']} (not sent because 256 were already in flight: "
        f"{soak['skipped_overload']}).",
        "",
    ]
    out += table(
        ["criterion", "figures", "result"],
        [
            [
                "RSS flat",
                f"{rss['after_warm_up']} MiB after warm-up → {rss['end']} MiB at the end "
                f"(+{rss['growth']}, bound +{rss['bound']}); {rss['start']} at start, peak "
                f"{rss['peak']}",
                verdict(crit["rss_flat"]),
            ],
            [
                "file descriptors bounded",
                f"{soak['fds']['after_warm_up']} after warm-up, at most {soak['fds']['max']}, "
                f"{soak['fds']['idle']} idle after the traffic",
                verdict(crit["fds_bounded"]),
            ],
            [
                "TCP connections bounded",
                f"{soak['tcp']['after_warm_up']} after warm-up, at most {soak['tcp']['max']}, "
                f"{soak['tcp']['idle']} idle",
                verdict(crit["tcp_bounded"]),
            ],
            [
                "no error-rate drift",
                f"{soak['errors']} errors of {soak['turns_sent']:,}",
                verdict(crit["error_rate"]),
            ],
            [
                "no lost record, budgets = ledger",
                f"{soak['lost_records']} lost, {soak['budget_mismatches']} mismatches",
                verdict(crit["no_lost_records"] and crit["budgets_equal_ledger"]),
            ],
            ["clean SIGTERM", f"exit {soak['sigterm_exit']}", verdict(crit["clean_exit"])],
        ],
    )
    out += [
        "",
        "What RSS does grow by after the warm-up is the intent cache filling: every complete "
        "answer is kept, up to `INTENT_CACHE_MAX_ENTRIES` (10,000 by default), about 0.6 KiB "
        "each; at 30 requests/s of mostly new questions it is full after 6 to 7 minutes, and "
        "RSS is flat from then on. A control run with the cache capped at 1,000 entries "
        "(240 s, 2026-11-27) grew 1.6 MiB after its warm-up and was flat (229.6 → 229.8 MiB) "
        "over its last 140 s.",
    ]
    samples = soak.get("samples", [])
    rss_at = {int(s["t"] // 60): s["rss_mib"] for s in samples}
    out += ["", "Per minute:", ""]
    out += table(
        [
            "minute",
            "sent",
            "answered",
            "fallbacks",
            "errors",
            "p50 ms",
            "p99 ms",
            "max ms",
            "RSS MiB (end of minute)",
        ],
        [
            [
                m["minute"],
                m["sent"],
                m["answered"],
                m["fallbacks"],
                m["errors"],
                m["p50_ms"],
                m["p99_ms"],
                m["max_ms"],
                rss_at.get(m["minute"] - 1),
            ]
            for m in soak["minutes"]
        ],
    )
    return [*out, ""]


def fast_note(fast: Any, run: dict[str, Any]) -> list[str]:
    info = run.get("fast") or {}
    if isinstance(fast, list):
        rows = [
            [
                s.get("name"),
                s.get("surface"),
                s.get("deadline_ms"),
                s.get("late"),
                s.get("median_latency_ms"),
                s.get("max_latency_ms"),
            ]
            for s in fast
            if isinstance(s, dict)
        ]
        return [
            f"The fast scenarios come from `tests/reliability/` (pytest, in-process fault "
            f"injection; {info.get('seconds', '?')} s, exit status {info.get('exit_status')}); "
            "they do not read the ledger, so their *lost records* column is empty. Their "
            "deadlines (*late*: answered after the deadline plus 0.75 s of slack):",
            "",
            *table(
                ["scenario", "surface", "deadline (ms)", "late", "median (ms)", "max (ms)"], rows
            ),
            "",
        ]
    why = info.get("reason") or "it wrote no scenario file (CXRELAY_RELIABILITY_REPORT)"
    return [f"*No fast fault-injection scenarios in this run: {why}.*", ""]


SUITE_FILES = {
    "test_faults_upstream": "fault injection: provider throttling, 5xx, refused, silent, a hang "
    "cut by the deadline",
    "test_faults_clients": "clients that hang up mid-stream or after [DONE], WebSockets asking "
    "at once after complete, a SIGKILLed replica's stream slots (SQLite and Redis)",
    "test_faults_answers": "fault injection: cut streams, closed WebSockets, broken output",
    "test_faults_dependencies": "fault injection: revoked key, CXone token down, Redis restart",
    "test_schemathesis_routes": "generated requests over the service's OpenAPI (schemathesis)",
    "test_bad_input_signatures": "signature verification properties (hypothesis)",
    "test_bad_input_bodies": "oversized, deep, invalid UTF-8 and huge bodies",
    "test_bad_input_templates": "template syntax in customer text; hostile caller templates",
    "test_abuse_auth": "replays and near-miss credentials reach nothing",
    "test_abuse_timing": "signature comparison time independent of matching bytes",
    "test_abuse_leaks": "no key or PII in logs, metrics, health or error bodies",
}


def suite_files_section(junit: Path) -> list[str]:
    """Every file of tests/reliability/ in the last run: tests, failures, seconds (pytest's
    JUnit XML); the bad-input and abuse suites assert rather than count turns."""
    if not junit.exists():
        return ["(no JUnit XML from the fast suite: run `make reliability`.)", ""]
    files: dict[str, list[float]] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = case.get("classname", "?").rsplit(".", 1)[-1]
        tests, failed, seconds = files.setdefault(name, [0, 0, 0.0])
        bad = any(case.find(tag) is not None for tag in ("failure", "error"))
        files[name] = [tests + 1, failed + bad, seconds + float(case.get("time", 0))]
    rows = [
        [name, SUITE_FILES.get(name, ""), int(t), int(f), f"{s:.1f}", "pass" if not f else "FAIL"]
        for name, (t, f, s) in sorted(files.items())
    ]
    header = ["file", "what it checks", "tests", "failed", "seconds", "result"]
    return [*table(header, rows), ""]
