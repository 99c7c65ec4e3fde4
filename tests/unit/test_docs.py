"""The documentation stays true to the code: the option table is the one
config.py generates, every metric, rejection reason and command has its
entry, and every link or citation of docs/ (in the pages, the README, code
comments) points at a page and a heading that exist."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from dcmstatus.cli.commands import _parser
from dcmstatus.core.model import REJECTION_REASONS
from dcmstatus.engine.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "scripts"))

import docs_tables  # noqa: E402

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_CITATION = re.compile(r"docs/([a-z][a-z0-9-]*\.md)(?:#([\w-]+))?")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to
    hyphens, a -1, -2... suffix for repeats."""
    anchors: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def _page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_the_option_table_is_generated_from_config():
    page = _page("configuration.md")
    assert docs_tables.replace_table(page, docs_tables.options_table()) == page, (
        "docs/configuration.md is stale: run `python scripts/docs_tables.py --write`"
    )


def test_every_metric_is_documented():
    names = {m.name for m in Metrics().registry.collect()}
    page = _page("operations.md")
    # prometheus-client reports counters without their _total suffix.
    missing = sorted(n for n in names if f"`{n}`" not in page and f"`{n}_total" not in page)
    assert not missing, f"metrics missing from docs/operations.md#metrics: {missing}"


def test_every_rejection_reason_has_its_own_section():
    anchors = _anchors(DOCS / "events.md")
    missing = [r for r in REJECTION_REASONS if r not in anchors]
    assert not missing, f"rejection reasons without a heading in docs/events.md: {missing}"


def test_every_command_has_its_own_section():
    commands = next(a for a in _parser()._actions if a.dest == "command").choices
    anchors = _anchors(DOCS / "cli.md")
    missing = sorted(c for c in commands if c not in anchors)
    assert not missing, f"commands without a heading in docs/cli.md: {missing}"


def _prose(text: str) -> str:
    """Markdown without code blocks and code spans, where links cannot be."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def _targets(source: Path) -> list[tuple[str, Path, str | None]]:
    """(what was written, page it names, anchor) for every relative link of a markdown file."""
    out = []
    for target in _LINK.findall(_prose(source.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        page = source if not path else (source.parent / path).resolve()
        out.append((target, page, anchor or None))
    return out


@pytest.mark.parametrize("source", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_links_reach_a_page_and_a_heading(source):
    broken = []
    for target, page, anchor in _targets(source):
        if not page.exists():
            broken.append(f"{target}: no such file")
        elif page.suffix == ".md" and anchor and anchor not in _anchors(page):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{source.name}: " + "; ".join(broken)


def test_citations_in_code_reach_a_page_and_a_heading():
    files = [ROOT / "Dockerfile", *ROOT.glob("dcmstatus/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("scripts/*.py")]
    broken = []
    for path in files:
        for page, anchor in _CITATION.findall(path.read_text(encoding="utf-8")):
            where = f"{path.relative_to(ROOT)}: docs/{page}{'#' + anchor if anchor else ''}"
            if not (DOCS / page).exists():
                broken.append(f"{where} (no such page)")
            elif anchor and anchor not in _anchors(DOCS / page):
                broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)
