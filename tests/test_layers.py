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
    assert "training" in _imported_layers(PACKAGE / "bench" / "serve" / "ceiling.py")  # a relative import, 3 dots


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


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imported_modules(path: Path) -> set[str]:
    """The modules of tl_models that ``path`` imports anywhere (at the top, in a function, under TYPE_CHECKING):
    ``from .x import y`` counts as ``x.y`` when that is a module, else as ``x``; a package's own ``__init__`` is
    not counted for its modules (Python runs it first, whoever imports what)."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != own and not own.startswith(name + "."):
                found.add(name)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or round a circle (Tarjan's strongly connected
    components with more than one module), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph.get(module, ())):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_of_tl_models_imports_round_a_circle():
    graph = {name: _imported_modules(path) for name, path in MODULES.items()}
    assert sum(map(len, graph.values())) > 100  # the graph is there: every module's imports were read
    assert import_cycles(graph) == [], "modules that import each other (give what they share a module of its own)"


def test_the_cycle_finder_finds_a_circle_through_a_lazy_import():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    assert "tl_models.training.traffic" in _imported_modules(PACKAGE / "training" / "methods.py")
    assert "tl_models.core.routing" in _imported_modules(PACKAGE / "triton" / "models" / "router.py")
