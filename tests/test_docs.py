"""The documentation site builds strictly (``mkdocs build --strict``, as ``make docs`` and CI run it): a broken
link or anchor, or a page of docs/ missing from the nav in mkdocs.yml, fails ``make test`` too. The links of the
root pages (README, CONTRIBUTING, CHANGELOG, ARCHITECTURE), which mkdocs does not see, resolve, and the README stays
at most 200 lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "reference" / "environment" / "index.html").is_file()


TOP_LEVEL = ("README.md", "CONTRIBUTING.md", "CHANGELOG.md", "ARCHITECTURE.md")


def _anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page, as mkdocs and GitHub spell them (lowercase, spaces to '-')."""
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)  # no shell comments
    headings = re.findall(r"^#+ (.*)$", prose, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_of_the_top_level_pages_resolve() -> None:
    """mkdocs checks docs/ only; README and the other root pages link into it, and those links must hold too."""
    broken = []
    for name in TOP_LEVEL:
        for target in re.findall(r"\]\(([^)\s]+)\)", (REPO / name).read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            page = REPO / path
            if not page.exists() or (anchor and anchor not in _anchors(page)):
                broken.append(f"{name}: {target}")
    assert not broken, broken


def test_the_readme_stays_short() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 200, "README.md: at most 200 lines; move text to docs/"
