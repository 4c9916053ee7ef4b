"""One version: the package's metadata, ``tl_models.__version__`` (what manifests record) and the newest changelog
entry agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import tl_models

REPO = Path(__file__).resolve().parents[1]


def test_the_package_version_is_the_newest_changelog_entry() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    changelog = (REPO / "README.md").read_text().split("## Changelog", 1)[1]
    newest = re.search(r"^### (\d+\.\d+\.\d+)", changelog, re.MULTILINE)
    assert newest is not None, "README's changelog has no '### X.Y.Z' entry"
    assert declared == tl_models.__version__ == newest.group(1)
