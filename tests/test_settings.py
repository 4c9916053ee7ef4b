"""The environment reference cannot drift: every ``TL_MODELS_*`` variable the code names is a row of
``tl_models.core.settings.SETTINGS``, every row is still named by the code, defaults the code spells as literals
are the documented ones, and ``docs/reference/environment.md`` is the rendered table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tl_models.core.settings import SCOPES, SETTINGS, Setting, render

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "reference" / "environment.md"
VARIABLE = re.compile(r"TL_MODELS_[A-Z0-9_]+")
# os.environ.get("TL_MODELS_X", "literal") / env.get(...): a default the code spells out
LITERAL_DEFAULT = re.compile(r"""\.get\(\s*"(TL_MODELS_[A-Z0-9_]+)"\s*,\s*"([^"]*)"\s*\)""")


def _sources() -> list[Path]:
    """Every file whose ``TL_MODELS_*`` names count: the package, the service, scripts and the tests' helpers
    (this file and the registry itself excepted)."""
    files = [
        *(REPO / "tl_models").rglob("*.py"),
        REPO / "service.py",
        *(REPO / "scripts").glob("*"),
        *(REPO / "tests").glob("*.py"),
    ]
    skip = {REPO / "tl_models" / "core" / "settings.py", Path(__file__).resolve()}
    return sorted(f for f in files if f.is_file() and f.resolve() not in skip)


def _named() -> dict[str, list[str]]:
    """Variable -> the files that name it."""
    named: dict[str, list[str]] = {}
    for path in _sources():
        for name in sorted(set(VARIABLE.findall(path.read_text()))):
            named.setdefault(name, []).append(str(path.relative_to(REPO)))
    return named


def test_every_variable_the_code_reads_is_in_the_table():
    missing = {name: files for name, files in _named().items() if name not in {s.name for s in SETTINGS}}
    assert not missing, f"add these to SETTINGS in tl_models/core/settings.py: {missing}"


def test_every_row_of_the_table_is_still_read():
    stale = sorted({s.name for s in SETTINGS} - set(_named()))
    assert not stale, f"no code names these any more; remove them from SETTINGS: {stale}"


def test_rows_are_unique_and_in_a_known_scope():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert {s.scope for s in SETTINGS} <= set(SCOPES)
    assert all(s.default and s.doc for s in SETTINGS)


def test_literal_defaults_in_the_code_are_the_documented_ones():
    documented = {s.name: s.default for s in SETTINGS}
    found = []
    for path in _sources():
        for name, literal in LITERAL_DEFAULT.findall(path.read_text()):
            found.append(name)
            assert f"`{literal}`" in documented[name], (
                f"{path.relative_to(REPO)} defaults {name} to {literal!r}; the table says {documented[name]!r}"
            )
    assert len(set(found)) >= 15, found  # the pattern still finds the code's defaults (19 when written)


def test_the_reference_page_is_the_rendered_table():
    assert PAGE.read_text() == render(), (
        "docs/reference/environment.md is out of date: "
        ".venv/bin/python -m tl_models.core.settings > docs/reference/environment.md"
    )


def test_a_pipe_in_a_cell_is_refused():
    with pytest.raises(ValueError, match="no '\\|'"):
        render((Setting("TL_MODELS_X", "a|b", "build", "doc"),))
