"""The code's shape, checked: the one-way import rule between the layers, and no torch on the serving path
(service.py, the BentoML side, the Triton models) or in the Triton packaging, swap and report commands."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tl_models"
# layer -> the layers of ours it may import (besides itself)
LAYERS = {"core", "training", "bento", "triton", "fleet", "deploy", "bench", "report", "cli"}
ALLOWED = {
    "core": set(),
    "training": {"core"},
    "bento": {"core"},
    "triton": {"core"},
    "fleet": {"core"},
    "deploy": {"core"},
    "report": {"core"},
    "bench": {"core", "training", "bento", "triton"},
    "cli": LAYERS - {"cli"},
}  # nothing imports the command line


def _imported_layers(path: Path) -> set[str]:
    """The top-level subpackages of tl_models that ``path`` imports (relative imports resolved)."""
    parts = path.relative_to(REPO).with_suffix("").parts  # ("tl_models", layer, ..., module)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[: len(parts) - node.level])
                names = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:
                    names = [".".join(base + [alias.name]) for alias in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "tl_models" and len(pieces) > 1 and pieces[1] in LAYERS:
                found.add(pieces[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_the_rule_allows(layer):
    module = PACKAGE / f"{layer}.py"
    files = [module] if module.exists() else sorted((PACKAGE / layer).rglob("*.py"))
    assert module.exists() or len(files) >= 2, files  # __init__.py and at least one module: the glob found it
    wrong = {}
    for path in files:
        extra = _imported_layers(path) - ALLOWED[layer] - {layer}
        if extra:
            wrong[str(path.relative_to(REPO))] = sorted(extra)
    assert not wrong, f"imports across the layer rule (see ARCHITECTURE.md): {wrong}"


def test_the_rule_checker_sees_a_relative_import_across_layers():
    assert _imported_layers(PACKAGE / "triton" / "swap.py") >= {"core"}
    assert "training" in _imported_layers(PACKAGE / "bench" / "serve.py")


SERVING = """
import json, sys, types
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")  # only inside Triton
import service
import tl_models.triton.models.router, tl_models.triton.models.preprocess, tl_models.triton.models.onnx_model
import tl_models.triton.repository, tl_models.triton.swap, tl_models.report, tl_models.fleet.bento, tl_models.cli
tl_models.cli.make_parser()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))))
"""


def test_the_serving_path_imports_no_torch():
    env = {"TL_MODELS_BUILD": "unused", "TL_MODELS_PREFLIGHT": "0", "BENTOML_DO_NOT_TRACK": "true"}
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run(
        [sys.executable, "-c", SERVING], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
