"""Triton model repository for a build: configs checked against Triton's protobuf schema, atomic writes.

For a build named NAME (its manifest's ``name``) the repository holds::

    preprocess/               python: image_bytes (TYPE_STRING) -> image (uint8 3×H×W), tl_models.core.preprocess
    NAME_backbone/1/          image -> embedding (ONNX: onnxruntime backend, or python backend + ONNX Runtime):
                              model.onnx (fp32, or with ``--precision int8`` the graph `tl-models quantize` wrote
                              past its gate), its sha256, and backbone.json (the fp32 sha256 heads are trained on,
                              the precision, the heads an int8 gate measured): what a swap's admission reads
    NAME_head_<head>/<v>/     embedding -> logits, one Triton version per head version: model.onnx, its sha256
                              in model.onnx.sha256 and head.json (labels, backbone sha256), which a swap's
                              admission checks (tl_models.core.heads.admit_head); labels.txt
    NAME_<head>/              ensemble image_bytes -> preprocess -> backbone -> head (pinned live version)
    NAME_<head>_tensor/       ensemble image -> backbone -> head
    NAME/                     python router: A/B split of tl_models.core.routing over ``NAME/route.json``;
                              preprocesses in-process, then backbone -> head: on the CPU (python flavour) the
                              graphs run in the router's process, else BLS calls to the models above

Every config is built as a ``ModelConfig`` message, printed as text, parsed back with ``text_format.Parse``
and checked (:func:`validate_config`) before it is written. A model or version directory is staged in a
hidden temp directory inside the repository and renamed into place, so it appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from ..core.files import atomic_write_bytes
from ..core.heads import backbone_from_build, frozen_versions, head_from_build
from ..core.manifest import BuildDir, HeadEntry, Manifest
from ..core.names import (
    CONFIG,
    EMBEDDING,
    HEAD_ONNX,
    IMAGE,
    IMAGE_BYTES,
    LABELS,
    LOGITS,
    PREPROCESS,
    ROUTE_FILE,
    VERSION_BACKBONE,
    VERSION_HEAD,
    VERSION_ONNX,
    VERSION_SHA256,
)
from ..core.preprocess import blank_image
from ..core.routing import Route, RoutingState, read_route
from ..core.runtime import CPU_RUN_ROWS
from .config import (
    RepositoryOptions,
    TritonConfigError,
    _tensor,
    backbone_model,
    config_text,
    ensemble_config,
    head_model,
    model_names,
    onnx_step_config,
    parse_config,
    preprocess_config,
    read_config,
    router_config,
    validate_config,
)

MODELS_DIR = Path(__file__).parent / "models"


@dataclass
class Repository:
    """What was written: the repository path, the models, and the live version of each head."""

    path: Path
    name: str
    models: list[str] = field(default_factory=list)
    live: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- atomic writing


def _write_tree(root: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> None:
    for rel in dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _same_tree(root: Path, files: dict[str, bytes]) -> bool:
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return present == set(files) and all((root / rel).read_bytes() == data for rel, data in files.items())


def _put_dir(parent: Path, name: str, files: dict[str, bytes], check=None, dirs: tuple[str, ...] = ()) -> bool:
    """Stage ``files`` in a hidden temp dir under ``parent``, check it, rename it to ``parent/name``.

    An identical existing directory is kept (returns False); a different one is swapped out.
    """
    target = parent / name
    if target.is_dir() and _same_tree(target, files):
        return False
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".staging-{name}-"))
    try:
        _write_tree(staging, files, dirs)
        if check is not None:
            check(staging)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-"))
            os.replace(target, old / name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def write_model(
    repo: Path,
    config: dict | mc.ModelConfig,
    files: dict[str, bytes] | None = None,
    versions: dict[int, dict[str, bytes]] | None = None,
) -> Path:
    """Write one model: a new model directory appears whole; in an existing one each version directory is
    staged and renamed, other files are replaced atomically, and the validated config is written last."""
    text = config_text(config)
    name = parse_config(text).name
    files, versions = dict(files or {}), versions or {}
    model_dir = repo / name
    if not model_dir.is_dir():
        tree = {**files, CONFIG: text.encode()}
        for version, content in versions.items():
            tree.update({f"{version}/{rel}": data for rel, data in content.items()})
        _put_dir(
            repo,
            name,
            tree,
            check=lambda staged: validate_config(text, staged, name),
            dirs=tuple(str(v) for v in versions),
        )
        return model_dir
    for version, content in versions.items():
        _put_dir(model_dir, str(version), content)
    for rel, data in files.items():
        _replace(model_dir / rel, data)
    validate_config(text, model_dir)
    _replace(model_dir / CONFIG, text.encode())
    return model_dir


def _replace(path: Path, data: bytes) -> None:
    """Atomically replace a file, but only when its content changes: Triton reloads models whose files are newer."""
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    """Validate and atomically replace an existing model's config (used by swap)."""
    text = config_text(config)
    validate_config(text, model_dir)
    _replace(Path(model_dir) / CONFIG, text.encode())


# ---------------------------------------------------------------- the repository of a build


def _warmup_png(size: int) -> bytes:
    """A grey PNG as one serialized TYPE_STRING element (4-byte little-endian length, then the bytes)."""
    image = blank_image(size, "PNG")
    return struct.pack("<I", len(image)) + image


def _labels(manifest: Manifest) -> bytes:
    labels = [str(label) for label in manifest.labels]
    if any("\n" in label for label in labels):
        raise TritonConfigError("a label contains a newline: Triton's label file is one label per line")
    return ("\n".join(labels) + "\n").encode()


def _version_files(onnx_path: Path, options: RepositoryOptions, facts: dict[str, dict]) -> dict[str, bytes]:
    """A version directory: model.onnx, its sha256 (checked by swap), the ``facts`` files (head.json or
    backbone.json) a swap's admission reads, model.py for the python flavour."""
    data = onnx_path.read_bytes()
    files = {VERSION_ONNX: data, VERSION_SHA256: hashlib.sha256(data).hexdigest().encode()}
    files.update({name: (json.dumps(content, indent=2) + "\n").encode() for name, content in facts.items()})
    if options.flavour == "python":
        files["model.py"] = (MODELS_DIR / "onnx_model.py").read_bytes()
    return files


def _live_versions(route_path: Path, served: list[HeadEntry]) -> dict[str, int]:
    """Live version per head: the route file's where it names one of the ``served`` versions, else the latest."""
    routed = read_route(route_path).versions
    built: dict[str, set[int]] = {}
    for entry in served:
        built.setdefault(entry.name, set()).add(entry.version)
    return {name: routed[name] if routed.get(name) in versions else max(versions) for name, versions in built.items()}


def _update_route(route_path: Path, live: dict[str, int], weights: dict[str, float] | None) -> None:
    """Keep a live route file; change it only for new heads or versions, or new weights."""
    state = RoutingState(route_path, poll=0)
    current = state.current().versions
    if weights is not None or current != {**current, **live}:
        state.update(weights=weights, versions=live)


def write_repository(build_dir: str | Path, repo: str | Path, options: RepositoryOptions | None = None) -> Repository:
    """Write (or update) the Triton entries of a build; existing version directories are kept when identical."""
    options = (options or RepositoryOptions()).check()
    build = BuildDir(build_dir)
    manifest = build.verify()
    served = frozen_versions(manifest)  # a tuned version's tail is not served yet
    name, heads = manifest.name, sorted({entry.name for entry in served})
    if not heads:
        raise TritonConfigError(f"build {build.path} has no heads: run `tl-models build` first")
    if not manifest.is_exported():
        raise TritonConfigError(f"build {build.path} is not exported to ONNX: run `tl-models export {build.path}`")
    backbone = backbone_from_build(build, manifest, options.precision)
    backbone.check_machine()
    models = model_names(name, heads)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    _check_preprocess(repo, manifest)
    route_path = repo / name / ROUTE_FILE
    live = _live_versions(route_path, served)
    ungated = [
        f"{h}:{v}"
        for h, v in sorted(live.items())
        if not backbone.serves(manifest.files[manifest.head(h, v).rel(HEAD_ONNX)])
    ]
    if ungated:
        raise TritonConfigError(
            f"live heads {ungated} of {route_path} were not measured by the int8 gate: swap "
            "them to a gated version first, or run `tl-models quantize` again"
        )
    if options.weights is not None and set(options.weights) - set(heads):
        raise TritonConfigError(
            f"weights for unknown heads {sorted(set(options.weights) - set(heads))}; the build has {heads}"
        )
    size, dim, classes = list(manifest.input_size), manifest.embedding_dim, len(manifest.labels)
    labels = _labels(manifest)
    for head in heads:
        versions = {}
        for entry in (e for e in served if e.name == head):
            source = head_from_build(build, manifest, entry).to_dict()
            facts = {k: source[k] for k in ("name", "version", "labels", "backbone_sha256", "origin")}
            versions[entry.version] = _version_files(build.file(entry.rel(HEAD_ONNX)), options, {VERSION_HEAD: facts})
        write_model(
            repo,
            onnx_step_config(
                head_model(name, head),
                options,
                _tensor(EMBEDDING, "TYPE_FP32", [dim]),
                _tensor(LOGITS, "TYPE_FP32", [classes], labels=True),
                [live[head]],
                threads=1,
            ),  # a D×C matmul: a thread pool would only get in the way
            {LABELS: labels},
            versions,
        )
    backbone_facts = {
        "sha256": backbone.sha256,
        "precision": backbone.precision,
        "gated": None if backbone.gated is None else sorted(backbone.gated),
        "int8_machine": backbone.int8_machine,
        "origin": backbone.origin,
    }
    backbone_files = _version_files(Path(backbone.path), options, {VERSION_BACKBONE: backbone_facts})
    write_model(
        repo,
        onnx_step_config(
            backbone_model(name),
            options,
            _tensor(IMAGE, "TYPE_UINT8", size),
            _tensor(EMBEDDING, "TYPE_FP32", [dim]),
            [1],
            precision=backbone.precision,
            spin=True,  # one thread pool per process, the heads run on one thread each
            rows=0 if options.gpu else CPU_RUN_ROWS,
        ),
        versions={1: backbone_files},
    )
    write_model(
        repo,
        preprocess_config(manifest, options),
        {f"warmup/{IMAGE_BYTES}": _warmup_png(size[-1])},
        {1: {"model.py": (MODELS_DIR / "preprocess.py").read_bytes()}},
    )
    for head in heads:
        for tensor in (False, True):
            write_model(
                repo, ensemble_config(name, head, live[head], manifest, options, tensor), {LABELS: labels}, {1: {}}
            )
    router_files = {LABELS: labels}
    if route_path.is_file():
        _update_route(route_path, live, options.weights)
    else:  # a new router directory appears with its route file
        weights = options.weights if options.weights is not None else {head: 1.0 for head in heads}
        router_files[ROUTE_FILE] = (json.dumps(Route(weights, live, 1).validate().to_dict(), indent=2) + "\n").encode()
    write_model(
        repo,
        router_config(name, manifest, options, backbone_files[VERSION_SHA256].decode()),
        router_files,
        {1: {"model.py": (MODELS_DIR / "router.py").read_bytes()}},
    )
    return Repository(repo, name, models, live)


def _check_preprocess(repo: Path, manifest: Manifest) -> None:
    """``preprocess`` is shared by the builds of a repository: they must agree on preprocessing."""
    if not (repo / PREPROCESS / CONFIG).is_file():
        return
    params = read_config(repo / PREPROCESS).parameters
    if "preprocessing" in params and json.loads(params["preprocessing"].string_value) != manifest.preprocessing:
        raise TritonConfigError(
            f"{repo / PREPROCESS} serves another preprocessing "
            f"({params['preprocessing'].string_value}): use another repository for this build"
        )
