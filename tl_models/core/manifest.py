"""The build format: a typed ``manifest.json`` (:class:`Manifest`, :class:`HeadEntry`) and :class:`BuildDir`, which
reads, verifies and commits it. The only module that reads or writes a manifest's keys.

Layout of a build directory (file names: :mod:`tl_models.core.names`)::

    manifest.json                       written last, atomically; the only source of truth
    backbone.pt, backbone.onnx          the backbone once, shared by every head
    heads/<name>/<version>/             head.pt, head.onnx, parity.json, history.json, curves.png, confusion.png
                                        (fused.onnx only when asked for: it would copy the backbone)

A head version is staged in ``heads/.staging-*`` and renamed into place whole; the manifest is rewritten
after that. A build killed at any point leaves the previous manifest and its files intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .errors import BuildError
from .files import atomic_write_json, file_lock, file_sha256
from .names import BACKBONE_ONNX, HEAD_ONNX, HEADS_DIR, MANIFEST

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: no fused model.onnx per head version (fused.onnx on request); 1 is read as well
READABLE_FORMATS = (1, 2)


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second: the manifest's timestamps."""
    return datetime.now(UTC).isoformat(timespec="seconds")


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _from_dict(cls: type[T], data: dict, where: str) -> T:
    """``cls(**data)`` for the dataclass ``cls``; a missing key is a BuildError naming it; unknown keys are kept
    out (a newer minor writer may add some)."""
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{key: value for key, value in data.items() if key in names})
    except TypeError as exc:
        raise BuildError(f"{where}: {exc}") from None


@dataclass
class HeadEntry:
    """One head version of a build."""

    name: str
    version: int
    kind: str
    spec: dict
    path: str  # relative: heads/<name>/<version>
    files: list[str]
    metrics: dict
    train: dict
    data: dict
    created: str = field(default_factory=utc_now)
    parity: dict | None = None
    tail: dict | None = None  # a fine-tuned version's own last stages on the build's trunk (training.tails)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def rel(self, file: str) -> str:
        """Relative path of one of this version's files."""
        return f"{self.path}/{file}"


@dataclass
class Manifest:
    """``manifest.json``: the backbone, preprocessing, labels, head versions and the sha256 of every file."""

    name: str
    backbone: str
    weights: str
    embedding_dim: int
    input_size: list[int]
    mean: list[float]
    std: list[float]
    preprocessing: dict
    labels: list[str]
    heads: list[HeadEntry] = field(default_factory=list)
    top_files: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    updated: str | None = None
    int8: dict | None = None  # `tl-models quantize`: calibration settings and the gate's figures per head
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> Manifest:
        """Parse a manifest; BuildError for an unknown format version or a missing key."""
        version = data.get("format_version") if isinstance(data, dict) else None
        if version not in READABLE_FORMATS:
            readable = ", ".join(map(str, READABLE_FORMATS))
            raise BuildError(
                f"{where} has format version {version!r}; this tl-models reads {readable}: use the "
                "tl-models that wrote it, or build again"
            )
        manifest = _from_dict(cls, data, where)
        manifest.heads = [
            _from_dict(HeadEntry, entry, f"{where}, head {i}") for i, entry in enumerate(data.get("heads", []))
        ]
        return manifest

    def to_dict(self) -> dict:
        return asdict(self)

    def head(self, name: str, version: int | None = None) -> HeadEntry:
        """A head's entry: the given version, else the latest; BuildError when there is none."""
        entries = [h for h in self.heads if h.name == name and (version is None or h.version == version)]
        if not entries:
            which = f"{name!r}" + (f" version {version}" if version else "")
            raise BuildError(f"no head {which} in build {self.name!r}")
        return max(entries, key=lambda h: h.version)

    def head_names(self) -> list[str]:
        return sorted({h.name for h in self.heads})

    def latest_versions(self) -> dict[str, int]:
        """The highest version of every head name."""
        return latest_versions(self.heads)

    def is_exported(self) -> bool:
        """Whether the backbone and every head version have their ONNX graphs."""
        return BACKBONE_ONNX in self.files and all(h.rel(HEAD_ONNX) in self.files for h in self.heads)

    def backbone_sha256(self) -> str:
        return self.files.get(BACKBONE_ONNX, "")


def latest_versions(heads: Iterable) -> dict[str, int]:
    """``name -> highest version`` of head versions (anything with ``name`` and ``version``)."""
    latest: dict[str, int] = {}
    for head in heads:
        latest[head.name] = max(latest.get(head.name, 0), head.version)
    return latest


class BuildDir:
    """A build directory: read and verify its manifest, stage and commit head versions under a lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> Manifest:
        """The committed manifest; BuildError when there is none or it cannot be read."""
        if not self.exists():
            raise BuildError(f"{self.path} is not a build directory (no {MANIFEST}); run `tl-models build` first")
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise BuildError(f"{self.manifest_path} is not valid JSON: {exc}") from None
        return Manifest.from_dict(data, str(self.manifest_path))

    def file(self, rel: str) -> Path:
        return self.path / rel

    def verify(self, manifest: Manifest | None = None) -> Manifest:
        """Check that every file listed in the manifest exists with its recorded sha256; the manifest."""
        manifest = manifest or self.manifest()
        for rel, expected in manifest.files.items():
            path = self.path / rel
            if not path.is_file():
                raise BuildError(f"{path} is listed in the manifest but missing")
            actual = file_sha256(path)
            if actual != expected:
                raise BuildError(f"{path} fails its sha256 check (expected {expected[:12]}…, got {actual[:12]}…)")
        return manifest

    def lock(self, create: bool = False) -> AbstractContextManager[None]:
        """Exclusive lock so two writers of one build (builds, quantize, export, parity) cannot interleave; a writer
        that has to wait says who it waits for. Without ``create`` (a first build) a folder that is not a build is
        refused before anything is written into it."""
        if not create and not self.exists():
            self.manifest()  # raises: not a build directory
        return file_lock(self.path / ".lock", waiting=self._waiting)

    def _waiting(self, holder: str) -> None:
        log.warning("waiting for %s: its lock is held by %s", self.path, holder)

    def next_version(self, name: str, manifest: Manifest | None) -> int:
        """1 + the highest version of ``name`` in the manifest or on disk (orphans of killed builds count)."""
        versions = [h.version for h in (manifest.heads if manifest else []) if h.name == name]
        head_dir = self.path / HEADS_DIR / name
        if head_dir.is_dir():
            versions += [int(p.name) for p in head_dir.iterdir() if p.name.isdigit()]
        return max(versions, default=0) + 1

    def staging_dir(self) -> Path:
        """A fresh folder for a head version being built; renamed into place by ``commit``."""
        (self.path / HEADS_DIR).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.path / HEADS_DIR, prefix=".staging-"))

    def commit(
        self,
        manifest: Manifest,
        staged: Path | None = None,
        head_rel: str | None = None,
        rewritten: tuple[str, ...] = (),
    ) -> Manifest:
        """Move a staged head version into place, hash new and ``rewritten`` files, write the manifest atomically."""
        if staged is not None:
            if head_rel is None:
                raise TypeError("commit: a staged head version needs its head_rel")
            target = self.path / head_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        known = {rel: digest for rel, digest in manifest.files.items() if rel not in rewritten}
        manifest.files = {rel: known.get(rel) or file_sha256(self.path / rel) for rel in _listed_files(manifest)}
        manifest.updated = utc_now()
        atomic_write_json(self.manifest_path, manifest.to_dict())
        return manifest

    def clean_staging(self) -> None:
        """Remove staging folders left by killed builds."""
        for stale in (self.path / HEADS_DIR).glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _listed_files(manifest: Manifest) -> list[str]:
    """Relative paths of the build's files: top-level ones named in the manifest and every committed head's."""
    rels = list(manifest.top_files)
    for head in manifest.heads:
        rels.extend(head.rel(name) for name in head.files)
    return rels
