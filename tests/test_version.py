"""One version: the package's metadata, ``tl_models.__version__`` (what manifests record) and the newest entry of
CHANGELOG.md agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import tl_models

REPO = Path(__file__).resolve().parents[1]


def test_the_package_version_is_the_newest_changelog_entry() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    changelog = (REPO / "CHANGELOG.md").read_text()
    newest = re.search(r"^### (\d+\.\d+\.\d+)", changelog, re.MULTILINE)
    assert newest is not None, "CHANGELOG.md has no '### X.Y.Z' entry"
    assert declared == tl_models.__version__ == newest.group(1)
