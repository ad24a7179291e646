"""The README's and docs/ pages' links and repository paths resolve.

Checked: every Markdown link or image to a file of the repository (relative to the page), with
its #anchor when it names one (GitHub's heading slugs), and every `backticked` path that starts
with one of the repository's top-level folders. Web links are not fetched (no network in tests)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "benchmarks" / "results").glob("*/README.md"))]
GENERATED = ("benchmarks/out/",)  # ignored by git: made by the commands a page describes, absent in a clone
TOP_FOLDERS = ("runtime/", "echo_train/", "echo_export/", "echo_serve/", "echo_dicom/", "benchmarks/", "docs/", "tests/")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def heading_slugs(text: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens (outside code fences)."""
    slugs = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slugs.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return slugs


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    text = page.read_text()
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.relative_to(root)}: link to {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in heading_slugs(dest.read_text()):
            bad.append(f"{page.relative_to(root)}: link to {target}: no heading #{anchor} in {dest.name}")
    return bad


def missing_paths(page: Path, root: Path = ROOT) -> list[str]:
    """Backticked repository paths (`runtime/engine.py`, `benchmarks/results/serve/`) that do not exist."""
    bad = []
    for code in CODE.findall(page.read_text()):
        for word in code.split():
            path = word.split("::")[0].rstrip(".,;:)")
            path = re.sub(r":\d+$", "", path)  # file:line
            if not path.startswith(TOP_FOLDERS) or path.startswith(GENERATED) or re.search(r"[*<>{}$]|\.\.\.", path):
                continue
            if not (root / path).exists():
                bad.append(f"{page.relative_to(root)}: `{path}` does not exist")
    return bad


def test_the_checks_see_a_broken_link_a_bad_anchor_and_a_missing_path(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "engine.py").write_text("")
    (tmp_path / "docs" / "a.md").write_text("# A page\n## Two words\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#two-words) [web](https://x.org/y) ![img](docs/none.png) [anchor](docs/a.md#three)\n"
                    "`runtime/engine.py:12` `runtime/gone.py` `runtime/*.py` `echo-report --x`\n")
    assert broken_links(page, tmp_path) == ["README.md: link to docs/none.png: no such file",
                                            "README.md: link to docs/a.md#three: no heading #three in a.md"]
    assert missing_paths(page, tmp_path) == ["README.md: `runtime/gone.py` does not exist"]


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move a topic into docs/"
    commands = [ln.split("#")[0].strip() for ln in lines if ln.startswith("make ")]
    assert commands[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_resolve(page):
    bad = broken_links(page) + missing_paths(page)
    assert not bad, "\n".join(bad)
