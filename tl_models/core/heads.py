"""Where backbone and head graphs come from, reading them verified, and the one head admission both servers use.

A head enters service (BentoML's registry, a Triton swap) only through :func:`admit_head`: sha256, ONNX Runtime
load, one input ``embedding`` and one output ``logits``, embedding size = the backbone's, trained on the same
backbone, a test run whose logits have one column per label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cpu import check_int8_machine
from .drift import EmbeddingReference
from .errors import BadRequest, BuildError, Forbidden, NotFound, Refused
from .identity import check_backbone, same_backbone
from .manifest import BuildDir, HeadEntry, Manifest, latest_versions
from .names import (
    ACTIVATION,
    BACKBONE_FILES,
    BACKBONE_INT8,
    BACKBONE_ONNX,
    EMBEDDING,
    EMBEDDING_REFERENCE_KEY,
    HEAD_ONNX,
    LOGITS,
    METADATA_PREFIX,
    TAIL_ONNX,
    check_name,
)
from .runtime import create_session

PRECISIONS = tuple(BACKBONE_FILES)


def check_precision(precision: str) -> str:
    """``precision`` when it is one the servers serve; BadRequest otherwise."""
    if precision not in PRECISIONS:
        raise BadRequest(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone graph lives and what it expects.

    ``sha256`` is the fp32 ``backbone.onnx``'s: the backbone heads are trained on and admitted against, whatever
    the precision served. ``graph_sha256`` is the served file's (an int8 graph's own). ``gated``: for int8, the
    sha256 of the head graphs its accuracy gate measured (only those may serve on it); None for fp32.
    ``int8_machine``: for int8, the CPU class and ONNX Runtime its gate measured it on (:mod:`.cpu`)."""

    path: str
    sha256: str
    preprocessing: dict
    labels: tuple[str, ...]
    build: str
    origin: str
    precision: str = "fp32"
    graph_sha256: str = ""
    gated: frozenset[str] | None = None
    int8_machine: dict | None = None

    def __post_init__(self) -> None:
        if not self.graph_sha256:  # fp32: the served file is the identity
            object.__setattr__(self, "graph_sha256", self.sha256)

    def serves(self, head_sha256: str) -> bool:
        """Whether a head graph may serve on this backbone as far as its precision goes (int8: gated heads only)."""
        return self.gated is None or head_sha256 in self.gated

    def check_machine(self) -> None:
        """For int8: Refused (one line) unless its gate measured it on this CPU class and ONNX Runtime minor."""
        if self.precision == "int8":
            check_int8_machine(self.int8_machine, self.origin)


@dataclass(frozen=True)
class TailSource:
    """A fine-tuned version's own tail (activation -> embedding) and the graphs of its cut that it runs on, each
    with its sha256: the build's trunk (image -> activation) and the frozen backbone's own tail for that cut (the
    frozen heads' path when a server runs the trunk)."""

    stages: int
    path: str
    sha256: str
    trunk: str
    trunk_sha256: str
    frozen_tail: str
    frozen_tail_sha256: str

    @classmethod
    def from_dict(cls, data: dict | None) -> TailSource | None:
        return None if data is None else cls(**{**data, "stages": int(data["stages"])})


@dataclass(frozen=True)
class HeadSource:
    """Where one head version's graph lives, its sha256, labels and the backbone (sha256) it was trained on."""

    name: str
    version: int
    path: str
    sha256: str
    labels: tuple[str, ...]
    backbone_sha256: str
    origin: str
    tail: TailSource | None = None  # a fine-tuned version's own tail: it runs on the trunk, not the whole backbone

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict, **override: object) -> HeadSource:
        values = {**data, **override}
        return cls(
            name=values["name"],
            version=int(values["version"]),
            path=str(values["path"]),
            sha256=values["sha256"],
            labels=tuple(values["labels"]),
            backbone_sha256=values["backbone_sha256"],
            origin=values["origin"],
            tail=values["tail"]
            if isinstance(values.get("tail"), TailSource)
            else TailSource.from_dict(values.get("tail")),
        )


def confined(path: str | Path, roots: Sequence[Path]) -> Path:
    """``path`` resolved (symlinks too) when it lies inside one of ``roots``; Forbidden otherwise."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(root) for root in roots) or "none"
        raise Forbidden(
            f"{path} is outside the directories this service loads builds from ({allowed}; set TL_MODELS_BUILD_ROOTS)"
        )
    return resolved


# ---------------------------------------------------------------- build directories as a source


def backbone_from_build(build: BuildDir, manifest: Manifest, precision: str = "fp32") -> BackboneSource:
    """The build's backbone graph of ``precision`` as a serving source; BuildError when the build is not exported,
    or (int8) has no int8 backbone that passed the gate for its latest heads."""
    if BACKBONE_ONNX not in manifest.files:
        raise BuildError(f"{build.path} has no {BACKBONE_ONNX}; run `tl-models export {build.path}` first")
    common: dict[str, Any] = dict(
        sha256=manifest.backbone_sha256(),
        preprocessing=manifest.preprocessing,
        labels=tuple(manifest.labels),
        build=manifest.name,
        origin=f"build:{build.path.resolve()}",
    )
    if check_precision(precision) == "fp32":
        return BackboneSource(path=str(build.file(BACKBONE_ONNX)), **common)
    gated = frozenset(int8_gated(build, manifest).values())
    return BackboneSource(
        path=str(build.file(BACKBONE_INT8)),
        precision="int8",
        graph_sha256=manifest.files[BACKBONE_INT8],
        gated=gated,
        int8_machine=(manifest.int8 or {}).get("machine"),  # int8_gated refused a build without the record
        **common,
    )


def int8_gated(build: BuildDir, manifest: Manifest) -> dict[str, str]:
    """``name:version -> head sha256`` of the heads the build's int8 gate passed; BuildError when there is no int8
    backbone, it was quantized from another backbone.onnx, or a head's latest version came after the gate."""
    record = manifest.int8 or {}
    again = f"run `tl-models quantize {build.path}`"
    if BACKBONE_INT8 not in manifest.files or "gated" not in record:
        raise BuildError(f"{build.path} has no int8 backbone that passed the accuracy gate: {again}")
    if not same_backbone(record.get("backbone_sha256"), manifest.backbone_sha256()):
        raise BuildError(
            f"{build.path}: {BACKBONE_INT8} was quantized from another {BACKBONE_ONNX} (exported again since?): {again}"
        )
    gated: dict[str, str] = record["gated"]
    latest = latest_frozen(manifest)
    late = [h.key for h in latest if manifest.files.get(h.rel(HEAD_ONNX)) not in gated.values()]
    if late:
        raise BuildError(f"{build.path}: heads {late} were built after the int8 gate measured this build: {again}")
    return gated


def head_from_build(build: BuildDir, manifest: Manifest, entry: HeadEntry) -> HeadSource:
    """One committed head version of a build as a serving source."""
    rel = entry.rel(HEAD_ONNX)
    return HeadSource(
        name=entry.name,
        version=entry.version,
        path=str(build.file(rel)),
        sha256=manifest.files[rel],
        labels=tuple(manifest.labels),
        backbone_sha256=manifest.backbone_sha256(),
        origin=f"build:{build.path.resolve()}",
        tail=None if entry.tail is None else _tail_from_build(build, manifest, entry),
    )


def _tail_from_build(build: BuildDir, manifest: Manifest, entry: HeadEntry) -> TailSource:
    assert entry.tail is not None  # only tuned versions have a tail
    trunk, frozen_tail, rel = entry.tail["trunk"], entry.tail["frozen_tail"], entry.rel(TAIL_ONNX)
    return TailSource(
        stages=int(entry.tail["stages"]),
        path=str(build.file(rel)),
        sha256=manifest.files[rel],
        trunk=str(build.file(trunk)),
        trunk_sha256=manifest.files[trunk],
        frozen_tail=str(build.file(frozen_tail)),
        frozen_tail_sha256=manifest.files[frozen_tail],
    )


def frozen_versions(manifest: Manifest) -> list[HeadEntry]:
    """The head versions that run on the build's backbone.onnx: all but the fine-tuned versions with a tail of their
    own (``training.tails``), which a BentoML service runs from a build directory but packaging does not take yet
    (the model store and Triton's repository hold the frozen versions)."""
    return [entry for entry in manifest.heads if entry.tail is None]


def latest_frozen(manifest: Manifest) -> list[HeadEntry]:
    """The latest of each head's :func:`frozen_versions`, in name order: what an int8 gate measures."""
    latest = latest_versions(frozen_versions(manifest))
    return [manifest.head(name, version) for name, version in sorted(latest.items())]


def sources_from_build(path: str | Path, precision: str = "fp32") -> tuple[BackboneSource, list[HeadSource]]:
    """The backbone of ``precision`` and every exported head version of a build directory that may serve on it
    (for int8: those its gate measured)."""
    build = BuildDir(path)
    manifest = build.manifest()
    backbone = backbone_from_build(build, manifest, precision)
    heads = [head_from_build(build, manifest, e) for e in manifest.heads if e.rel(HEAD_ONNX) in manifest.files]
    return backbone, [h for h in heads if backbone.serves(h.sha256)]


def head_source_from_build(path: str | Path, name: str, version: int | None = None) -> HeadSource:
    """One head version of a build directory (the latest when ``version`` is None); NotFound if absent."""
    check_name(name)
    build = BuildDir(path)
    try:
        manifest = build.manifest()
        entry = manifest.head(name, version)
    except BuildError as exc:
        raise NotFound(exc.message) from None
    if entry.rel(HEAD_ONNX) not in manifest.files:
        raise NotFound(f"head {entry.key} of {build.path} has no {HEAD_ONNX}; run `tl-models export {build.path}`")
    source = head_from_build(build, manifest, entry)
    confined(source.path, [build.path])  # a manifest entry must not point outside its build directory
    return source


# ---------------------------------------------------------------- reading and admitting


def read_verified(path: str | Path, sha256: str, what: str) -> bytes:
    """The bytes of a model file after checking its sha256 (Refused when missing or different)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise Refused(f"{what}: cannot read {path}: {exc.strerror}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise Refused(f"{what}: {path} fails its sha256 check (expected {sha256[:12]}…, got {actual[:12]}…)")
    return data


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


@dataclass
class LoadedHead:
    """An admitted head session: ``embedding (N×D) -> logits (N×C)``, and the summary of the embeddings it was
    trained on (None for heads built before drift was measured)."""

    source: HeadSource
    session: Any  # an onnxruntime.InferenceSession
    reference: EmbeddingReference | None = None
    tail: Any | None = None  # a fine-tuned version's tail session: activation -> embedding

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def path(self) -> str:
        """Which embeddings it takes: ``""`` the frozen backbone's, else its own key (a tuned version's tail)."""
        return "" if self.tail is None else self.source.key

    @property
    def version(self) -> int:
        return self.source.version

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        logits: np.ndarray = self.session.run([LOGITS], {EMBEDDING: embeddings.astype(np.float32, copy=False)})[0]
        return logits

    def answer(self, logits: np.ndarray, top_k: int) -> list[dict]:
        """Top-k labels with softmax scores per row, and which head answered."""
        scores = softmax(logits)
        k = max(1, min(top_k, scores.shape[1]))
        answers = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            answers.append(
                {
                    "head": self.name,
                    "version": self.version,
                    "predictions": [{"label": self.source.labels[i], "score": float(row[i])} for i in order],
                }
            )
        return answers


def admit_head(
    source: HeadSource,
    embedding_dim: int,
    backbone_sha256: str,
    providers: str | None = None,
    data: bytes | None = None,
    gated: frozenset[str] | None = None,
    tail_threads: int | None = None,
) -> LoadedHead:
    """Read ``source`` (unless its verified ``data`` is given) and admit it; Refused or Conflict with the reason.

    The one admission of both servers: sha256, ONNX Runtime load, input ``embedding`` N×``embedding_dim`` and
    output ``logits``, trained on the backbone with ``backbone_sha256``, on an int8 backbone one its gate measured
    (sha256 in ``gated``), a test run giving one finite logit per label. A fine-tuned version's tail too
    (:func:`admit_tail`: its session gets ``tail_threads``)."""
    what = f"head {source.key}"
    check_name(source.name)
    check_backbone(what, source.backbone_sha256, backbone_sha256, "this service")
    if gated is not None and source.sha256 not in gated:
        raise Refused(
            f"{what} was not measured by the accuracy gate of this int8 backbone: run `tl-models quantize` "
            "on its build and package it again, or serve fp32"
        )
    data = read_verified(source.path, source.sha256, what) if data is None else data
    try:
        # one thread: a head is a D×C matmul; a pool thread of its own would only spin beside the backbone
        session = create_session(data, providers=providers, threads=1, name=what)
    except Exception as exc:  # ORT raises its own exception types for malformed graphs
        raise Refused(f"{what}: not a loadable ONNX model: {exc}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = ([i.name for i in inputs], [o.name for o in outputs])
    if names != ([EMBEDDING], [LOGITS]):
        raise Refused(
            f"{what}: expected one input {EMBEDDING!r} and one output {LOGITS!r}, got inputs {names[0]} "
            f"and outputs {names[1]}"
        )
    shape = inputs[0].shape
    if len(shape) != 2 or shape[1] != embedding_dim:
        raise Refused(
            f"{what}: takes input of shape {shape}, the backbone produces embeddings of dimension {embedding_dim}"
        )
    tail = None if source.tail is None else admit_tail(source.tail, what, embedding_dim, providers, tail_threads)
    head = LoadedHead(source, session, _reference(session, what), tail)
    try:
        logits = head.logits(np.zeros((2, embedding_dim), dtype=np.float32))
    except Exception as exc:
        raise Refused(f"{what}: test run failed: {exc}") from None
    if logits.shape != (2, len(source.labels)) or not np.isfinite(logits).all():
        raise Refused(f"{what}: produced logits of shape {logits.shape} for {len(source.labels)} labels")
    return head


def admit_tail(
    tail: TailSource, what: str, embedding_dim: int, providers: str | None = None, threads: int | None = None
) -> Any:
    """A tuned version's tail session after its checks: sha256, ONNX Runtime load, one input ``activation`` and one
    output ``embedding`` of ``embedding_dim``, a test run giving finite embeddings; Refused with the reason."""
    what = f"{what}'s tail"
    data = read_verified(tail.path, tail.sha256, what)
    try:
        session = create_session(data, providers=providers, threads=threads, name=what)
    except Exception as exc:  # ORT raises its own exception types for malformed graphs
        raise Refused(f"{what}: not a loadable ONNX model: {exc}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [ACTIVATION] or [o.name for o in outputs] != [EMBEDDING]:
        raise Refused(f"{what}: expected one input {ACTIVATION!r} and one output {EMBEDDING!r}")
    shape = inputs[0].shape[1:]
    if not all(isinstance(d, int) for d in shape):
        raise Refused(f"{what}: its activation shape {inputs[0].shape} is not fixed past the batch axis")
    try:
        embedding = session.run([EMBEDDING], {ACTIVATION: np.zeros((2, *shape), np.float32)})[0]
    except Exception as exc:
        raise Refused(f"{what}: test run failed: {exc}") from None
    if embedding.shape != (2, embedding_dim) or not np.isfinite(embedding).all():
        raise Refused(f"{what}: produced embeddings of shape {embedding.shape}, the backbone's are {embedding_dim}-d")
    return session


def _reference(session: Any, what: str) -> EmbeddingReference | None:
    """The head's training-embedding summary from its ONNX metadata (written by the build), if it has one."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_PREFIX + EMBEDDING_REFERENCE_KEY)
    if text is None:
        return None
    try:
        return EmbeddingReference.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise Refused(f"{what}: unreadable embedding reference in its metadata: {exc}") from None
