"""The head side of serving: where backbone and head graphs come from, verified loading, and the head catalog.

A head enters service only after every check (sha256, ONNX Runtime load, embedding dim = backbone output, a
test run). The catalog (``name:version -> where its head.onnx lives``) is a JSON file shared by all workers.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifacts import BuildDir, BuildError, atomic_write_json, file_lock
from .runtime import create_session

log = logging.getLogger(__name__)

# File names of tl_models.export (not imported here: it pulls in torch, which serving does without).
BACKBONE_ONNX, HEAD_ONNX = "backbone.onnx", "head.onnx"


class ServingError(Exception):
    """A request the service refuses; ``status`` is the HTTP status to answer with (4xx: the client's mistake)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone graph lives and what it expects."""

    path: str
    sha256: str
    preprocessing: dict
    labels: tuple[str, ...]
    build: str
    origin: str


@dataclass(frozen=True)
class HeadSource:
    """Where one head version's ``head.onnx`` lives, its sha256, labels and the backbone it was trained on."""

    name: str
    version: int
    path: str
    sha256: str
    labels: tuple[str, ...]
    backbone_sha256: str
    origin: str

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict) -> "HeadSource":
        return cls(name=data["name"], version=int(data["version"]), path=data["path"], sha256=data["sha256"],
                   labels=tuple(data["labels"]), backbone_sha256=data["backbone_sha256"], origin=data["origin"])


_HEAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_head_name(name: str) -> str:
    """``name`` when it is a safe head name (letters, digits, '_', '.', '-'; no path parts), else ServingError 400.

    Head names become file names in the state directory and parts of model tags: nothing that could walk out."""
    if not _HEAD_NAME.fullmatch(name) or ".." in name:
        raise ServingError(f"bad head name {name!r}: use up to 63 letters, digits, '_', '.' and '-' "
                           "(no path separators, no '..')")
    return name


def confined(path: str | Path, roots: Sequence[Path]) -> Path:
    """``path`` resolved (symlinks too) when it lies inside one of ``roots``; ServingError 403 otherwise."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(root) for root in roots) or "none"
        raise ServingError(f"{path} is outside the directories this service loads builds from ({allowed}; "
                           "set TL_MODELS_BUILD_ROOTS)", 403)
    return resolved


# ---------------------------------------------------------------- build directories as a source

def sources_from_build(path: str | Path) -> tuple[BackboneSource, list[HeadSource]]:
    """The backbone and every exported head version of a build directory (as recorded in its manifest)."""
    build = BuildDir(path)
    manifest = build.manifest()
    if BACKBONE_ONNX not in manifest.get("files", {}):
        raise BuildError(f"{build.path} has no {BACKBONE_ONNX}; run `tl-models export {build.path}` first")
    backbone = BackboneSource(path=str(build.path / BACKBONE_ONNX), sha256=manifest["files"][BACKBONE_ONNX],
                              preprocessing=manifest["preprocessing"], labels=tuple(manifest["labels"]),
                              build=manifest["name"], origin=f"build:{build.path.resolve()}")
    heads = [_head_from_manifest(build, manifest, entry) for entry in manifest["heads"]
             if f"{entry['path']}/{HEAD_ONNX}" in manifest["files"]]
    return backbone, heads


def head_source_from_build(path: str | Path, name: str, version: int | None = None) -> HeadSource:
    """One head version of a build directory (the latest when ``version`` is None); ServingError 404 if absent."""
    check_head_name(name)
    build = BuildDir(path)
    try:
        manifest = build.manifest()
        entry = build.head(name, version, manifest)
    except BuildError as exc:
        raise ServingError(str(exc), 404) from None
    if f"{entry['path']}/{HEAD_ONNX}" not in manifest["files"]:
        raise ServingError(f"head {name}:{entry['version']} of {build.path} has no {HEAD_ONNX}; "
                           f"run `tl-models export {build.path}`", 404)
    source = _head_from_manifest(build, manifest, entry)
    confined(source.path, [build.path])  # a manifest entry must not point outside its build directory
    return source


def _head_from_manifest(build: BuildDir, manifest: dict, entry: dict) -> HeadSource:
    rel = f"{entry['path']}/{HEAD_ONNX}"
    return HeadSource(name=entry["name"], version=int(entry["version"]), path=str(build.path / rel),
                      sha256=manifest["files"][rel], labels=tuple(manifest["labels"]),
                      backbone_sha256=manifest["files"].get(BACKBONE_ONNX, ""),
                      origin=f"build:{build.path.resolve()}")


# ---------------------------------------------------------------- heads

@dataclass
class LoadedHead:
    """A validated head session: ``embedding (N×D) -> logits (N×C)``."""

    source: HeadSource
    session: object
    input_name: str
    output_name: str

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> int:
        return self.source.version

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: embeddings.astype(np.float32, copy=False)})[0]

    def answer(self, logits: np.ndarray, top_k: int) -> list[dict]:
        """Top-k labels with softmax scores per row, and which head answered."""
        scores = softmax(logits)
        k = max(1, min(top_k, scores.shape[1]))
        answers = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            answers.append({"head": self.name, "version": self.version,
                            "predictions": [{"label": self.source.labels[i], "score": float(row[i])} for i in order]})
        return answers


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def read_verified(path: str | Path, sha256: str, what: str) -> bytes:
    """The bytes of a model file after checking its sha256 (ServingError 422 when missing or different)."""
    import hashlib

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ServingError(f"{what}: cannot read {path}: {exc.strerror}", 422) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ServingError(f"{what}: {path} fails its sha256 check (expected {sha256[:12]}…, got {actual[:12]}…)", 422)
    return data


def load_head(source: HeadSource, data: bytes, embedding_dim: int, backbone_sha256: str,
              providers: str | None = None) -> LoadedHead:
    """Create and validate a head session from verified bytes; ServingError (409/422) on any mismatch."""
    what = f"head {source.key}"
    if source.backbone_sha256 and source.backbone_sha256 != backbone_sha256:
        raise ServingError(f"{what} was trained on another backbone (sha256 {source.backbone_sha256[:12]}…, "
                           f"this service runs {backbone_sha256[:12]}…)", 409)
    try:
        # one thread: a head is a D×C matmul; a pool thread of its own would only spin beside the backbone
        session = create_session(data, providers=providers, threads=1, name=f"head {source.key}")
    except Exception as exc:  # ORT raises its own exception types for malformed graphs
        raise ServingError(f"{what}: not a loadable ONNX model: {exc}", 422) from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ServingError(f"{what}: expected one input and one output, got {len(inputs)} and {len(outputs)}", 422)
    shape = inputs[0].shape
    if len(shape) != 2 or shape[1] != embedding_dim:
        raise ServingError(f"{what}: takes input of shape {shape}, the backbone produces embeddings of "
                           f"dimension {embedding_dim}", 422)
    head = LoadedHead(source, session, inputs[0].name, outputs[0].name)
    try:
        logits = head.logits(np.zeros((2, embedding_dim), dtype=np.float32))
    except Exception as exc:
        raise ServingError(f"{what}: test run failed: {exc}", 422) from None
    if logits.shape != (2, len(source.labels)) or not np.isfinite(logits).all():
        raise ServingError(f"{what}: produced logits of shape {logits.shape} for {len(source.labels)} labels", 422)
    return head


class HeadCatalog:
    """``name:version -> HeadSource`` in a JSON file of the state directory, shared by every worker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._cache: dict[str, HeadSource] = {}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()

    def entries(self) -> dict[str, HeadSource]:
        """All entries (re-read when the file changed)."""
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                return {}
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                data = json.loads(self.path.read_text())
                self._cache = {key: HeadSource.from_dict(value) for key, value in data.items()}
                self._stamp = stamp
            return dict(self._cache)

    def get(self, name: str, version: int) -> HeadSource | None:
        return self.entries().get(f"{name}:{version}")

    def locked(self) -> AbstractContextManager[None]:
        """Exclusive lock across processes (state changes by admin calls and startup are serialised)."""
        return file_lock(self.path.with_name(self.path.name + ".lock"))

    def put(self, sources: Sequence[HeadSource], overwrite: bool = False) -> None:
        """Add entries (call under :meth:`locked`); ServingError 409 for a known version with other bytes."""
        entries = self.entries()
        for source in sources:
            known = entries.get(source.key)
            if known is not None and known.sha256 != source.sha256 and not overwrite:
                raise ServingError(f"head {source.key} is already known with another head.onnx "
                                   f"(sha256 {known.sha256[:12]}…, from {known.origin}); "
                                   "give the new head a new version", 409)
            entries[source.key] = source
        atomic_write_json(self.path, {key: value.to_dict() for key, value in sorted(entries.items())})
