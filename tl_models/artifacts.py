"""The on-disk build format: ``manifest.json`` + files, atomic writes, sha256 checks, a build lock.

Layout of a build directory::

    manifest.json                       written last, atomically; the only source of truth
    backbone.pt                         backbone state_dict (frozen, or fine-tuned with --unfreeze-last)
    heads/<name>/<version>/head.pt      head state_dict, metrics.json, curves.png, confusion.png, ...

A head version is staged in ``heads/.staging-*`` and renamed into place whole; the manifest is
rewritten after that. A build killed at any point leaves the previous manifest and its files intact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class BuildError(RuntimeError):
    """A build directory that is missing, inconsistent or fails its sha256 checks."""


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: object) -> None:
    """Atomically write pretty JSON."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_torch(path: str | Path, obj: object) -> None:
    """Atomically ``torch.save`` an object (state_dicts only: they load back with weights_only=True)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing), across processes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class BuildDir:
    """A build directory: read and verify its manifest, stage and commit head versions under a lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        """The committed manifest; BuildError when there is none."""
        if not self.exists():
            raise BuildError(f"{self.path} is not a build directory (no {MANIFEST}); run `tl-models build` first")
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise BuildError(f"{self.manifest_path} is not valid JSON: {exc}") from None

    def verify(self, manifest: dict | None = None) -> None:
        """Check that every file listed in the manifest exists with its recorded sha256."""
        manifest = manifest or self.manifest()
        for rel, expected in manifest["files"].items():
            path = self.path / rel
            if not path.is_file():
                raise BuildError(f"{path} is listed in the manifest but missing")
            actual = file_sha256(path)
            if actual != expected:
                raise BuildError(f"{path} fails its sha256 check (expected {expected[:12]}…, got {actual[:12]}…)")

    def head(self, name: str, version: int | None = None, manifest: dict | None = None) -> dict:
        """A head's manifest entry: the given version, else the latest."""
        heads = [h for h in (manifest or self.manifest())["heads"] if h["name"] == name]
        if version is not None:
            heads = [h for h in heads if h["version"] == version]
        if not heads:
            raise BuildError(f"no head {name!r}" + (f" version {version}" if version else "") + f" in {self.path}")
        return max(heads, key=lambda h: h["version"])

    def lock(self) -> AbstractContextManager[None]:
        """Exclusive lock so two builds into one directory cannot interleave."""
        return file_lock(self.path / ".lock")

    def next_version(self, name: str, manifest: dict | None) -> int:
        """1 + the highest version of ``name`` in the manifest or on disk (orphans of killed builds count)."""
        versions = [h["version"] for h in (manifest or {}).get("heads", []) if h["name"] == name]
        head_dir = self.path / "heads" / name
        if head_dir.is_dir():
            versions += [int(p.name) for p in head_dir.iterdir() if p.name.isdigit()]
        return max(versions, default=0) + 1

    def staging_dir(self) -> Path:
        """A fresh folder for a head version being built; renamed into place by ``commit``."""
        (self.path / "heads").mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.path / "heads", prefix=".staging-"))

    def commit(self, manifest: dict, staged: Path | None = None, head_rel: str | None = None,
               rewritten: tuple[str, ...] = ()) -> dict:
        """Move a staged head version into place, hash new and ``rewritten`` files, write the manifest atomically."""
        if staged is not None:
            target = self.path / head_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        known = {rel: digest for rel, digest in manifest.get("files", {}).items() if rel not in rewritten}
        files = {rel: known.get(rel) or file_sha256(self.path / rel) for rel in _listed_files(manifest)}
        manifest["files"] = files
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def clean_staging(self) -> None:
        """Remove staging folders left by killed builds."""
        for stale in (self.path / "heads").glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _listed_files(manifest: dict) -> list[str]:
    """Relative paths of the build's files: top-level ones named in the manifest and every committed head's."""
    rels = list(manifest.get("top_files", []))
    for head in manifest.get("heads", []):
        rels.extend(f"{head['path']}/{name}" for name in head["files"])
    return rels
