"""The documentation site builds strictly (``mkdocs build --strict``, as ``make docs`` and CI run it): a broken
link or anchor, or a page of docs/ missing from the nav in mkdocs.yml, fails ``make test`` too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "reference" / "environment" / "index.html").is_file()
