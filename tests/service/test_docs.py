"""The README and docs/ stay navigable and true: every relative link reaches a file (and its
heading, for an anchor), every docs page is reachable from the README, and the names
docs/troubleshooting.md tells a reader to look for (metrics, log events, /health fields) exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
_LINK = re.compile(r"\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def prose(path: Path) -> str:
    """The page without its code blocks and inline code (a link inside them is an example)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return re.sub(r"`[^`\n]*`", "``", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, a repeated
    one suffixed -1, -2, ..."""
    found: set[str] = set()
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if heading := re.match(r"^#{1,6} (.+?)\s*#*$", line):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            candidate, n = slug, 0
            while candidate in found:
                n += 1
                candidate = f"{slug}-{n}"
            found.add(candidate)
    return found


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in _LINK.findall(prose(path))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {
        (ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")
    }
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, unlinked


def test_each_docs_page_starts_with_what_it_is_for() -> None:
    """A title, then one paragraph saying what the page is and when a reader needs it."""
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), page.name
        assert lines[1] == "" and lines[2] and not lines[2].startswith("#"), page.name


def test_the_readme_fits_on_a_few_screens() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


# --- docs/troubleshooting.md names only what exists ---------------------------------------------

TROUBLESHOOTING = DOCS / "troubleshooting.md"


def _code_spans(path: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", _FENCE.sub("", path.read_text(encoding="utf-8")))


def _app_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "app").rglob("*.py")))


def test_troubleshooting_cites_only_metrics_the_service_exports() -> None:
    from tests.service.test_deploy_files import exported_names

    exported = exported_names()
    cited = {
        name
        for span in _code_spans(TROUBLESHOOTING)
        for name in re.findall(r"\bcxrelay_[a-z0-9_]+", span)
    }
    assert len(cited) >= 10, cited
    unknown = {
        n for n in cited if n not in exported and not any(e.startswith(n + "_") for e in exported)
    }
    assert not unknown, unknown


def test_troubleshooting_cites_only_log_lines_the_code_writes() -> None:
    """`"message": "..."` and `"logger": "..."` as quoted; "…" stands for a value filled in."""
    source = _app_source()
    spans = _code_spans(TROUBLESHOOTING)
    messages = [m for s in spans for m in re.findall(r'"message": "([^"]+)"', s)]
    loggers = [m for s in spans for m in re.findall(r'"logger": "([^"]+)"', s)]
    assert len(messages) >= 10, messages
    missing = [
        m for m in messages if any(p.strip() not in source for p in m.split("…") if p.strip())
    ]
    assert not missing, missing
    assert all(f'getLogger("{name}")' in source for name in loggers), loggers


def test_troubleshooting_cites_only_real_settings_and_alerts() -> None:
    from app.core.setting_names import names_of
    from app.core.settings import Settings

    settings = {
        n.upper() for name, field in Settings.model_fields.items() for n in names_of(field, name)
    }
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    spans = _code_spans(TROUBLESHOOTING)
    variables = {s for s in spans if re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+", s)}
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")  # compose's own, too
    unknown = sorted(v for v in variables - settings if f"${{{v}" not in compose)
    assert variables and not unknown, unknown
    for alert in {s for s in spans if re.fullmatch(r"CxRelay[A-Za-z0-9]+", s)}:
        assert f"alert: {alert}" in alerts, alert
