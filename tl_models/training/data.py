"""Labelled images: an ImageFolder (class = sub-folder name) or a listing file (CSV/Parquet of path,label with an
optional split); the seeded stratified split, and the demo data set.

Every image is checked as serving decodes it while the folder or listing is read (in a thread pool: the check
decodes), and its sha256 is taken from the same read: the data part of the feature cache key costs no second read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from ..core.errors import BadRequest
from ..core.preprocess import ImageError, Preprocessing, check_image, preprocess_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DataError(BadRequest):
    """The data folder cannot be used for training; the message says why."""


ImagePath = Path | str  # a local file, or an fsspec URL (s3://, gs://, memory://, ...) read through fsspec


def read_image_bytes(path: ImagePath) -> bytes:
    """The bytes of a local image file or of an fsspec URL."""
    if isinstance(path, Path):
        return path.read_bytes()
    import fsspec

    with fsspec.open(path, "rb") as handle:
        return handle.read()


def read_image(path: ImagePath, preprocessing: Preprocessing) -> np.ndarray:
    """A local image file or fsspec URL as the model input serving makes of it (uint8 CHW)."""
    return preprocess_bytes(read_image_bytes(path), preprocessing)


def decode_workers() -> int:
    """Threads that decode images (the scan's check, extraction): ``$TL_MODELS_DECODE_WORKERS``, else the CPU
    count (PIL decodes and resizes without the GIL, so threads overlap with the backbone's own)."""
    return max(1, int(os.environ.get("TL_MODELS_DECODE_WORKERS", "0")) or os.cpu_count() or 1)


@dataclass
class ImageFolderData:
    """Readable images of a data set (an ImageFolder or a listing), their class indices, what was skipped and why,
    and, from a listing with a ``split`` column, the fixed train/val split."""

    root: Path
    classes: list[str]
    paths: list[ImagePath]
    targets: list[int]
    skipped: list[tuple[ImagePath, str]] = field(default_factory=list)
    splits: list[str] | None = None  # "train" or "val" per image, from a listing
    _hash: str | None = field(default=None, repr=False)
    _file_hashes: list[bytes] | None = field(default=None, repr=False)

    def file_hashes(self) -> list[bytes]:
        """sha256 digest of every image file, in ``paths`` order (taken when the data was read, else read once)."""
        if self._file_hashes is None:
            self._file_hashes = [hashlib.sha256(read_image_bytes(path)).digest() for path in self.paths]
        return self._file_hashes

    def names(self) -> list[str]:
        """How the content hash names each image: its path relative to the folder (a listing's: the listing's
        folder), or its URL."""
        base = self.root if self.root.is_dir() else self.root.parent
        return [
            str(p.relative_to(base)) if isinstance(p, Path) and p.is_relative_to(base) else str(p) for p in self.paths
        ]

    def content_hash(self) -> str:
        """sha256 over (name, class, file sha256) of every image (and the split, from a listing that has one):
        the data part of the cache key."""
        if self._hash is None:
            digest = hashlib.sha256()
            for index, (name, target, file_hash) in enumerate(zip(self.names(), self.targets, self.file_hashes())):
                digest.update(f"{name}\0{self.classes[target]}\0".encode())
                digest.update(file_hash)
                if self.splits is not None:
                    digest.update(self.splits[index].encode())
            self._hash = digest.hexdigest()
        return self._hash

    def split(self, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Indices (train, val): the listing's own split where it has one, else :func:`stratified_split`."""
        if self.splits is None:
            return stratified_split(self.targets, val_fraction, seed)
        return (
            [i for i, s in enumerate(self.splits) if s == "train"],
            [i for i, s in enumerate(self.splits) if s == "val"],
        )

    def subset(self, indices: Iterable[int]) -> ImageFolderData:
        """The images at ``indices`` (classes kept, nothing skipped), e.g. a calibration or benchmark sample."""
        chosen = list(indices)
        hashes = self._file_hashes
        return ImageFolderData(
            self.root,
            self.classes,
            [self.paths[i] for i in chosen],
            [self.targets[i] for i in chosen],
            splits=None if self.splits is None else [self.splits[i] for i in chosen],
            _file_hashes=None if hashes is None else [hashes[i] for i in chosen],
        )


def _check_image(path: ImagePath) -> tuple[str | None, bytes]:
    """(None, sha256 digest) when the file decodes as serving decodes it (``tl_models.core.preprocess``), else (the
    reason it does not, b""): training skips what the servers would refuse (unreadable, truncated, too small, too
    large, needle-shaped)."""
    try:
        data = read_image_bytes(path)
        check_image(data)
    except (ImageError, OSError) as exc:
        return str(exc), b""
    return None, hashlib.sha256(data).digest()


def _check_all(paths: list[ImagePath]) -> list[tuple[str | None, bytes]]:
    """:func:`_check_image` of every path, in order, on :func:`decode_workers` threads."""
    if len(paths) < 64:
        return [_check_image(p) for p in paths]
    with ThreadPoolExecutor(decode_workers(), thread_name_prefix="tl-models-scan") as pool:
        return list(pool.map(_check_image, paths, chunksize=64))


def load_image_folder(root: str | Path) -> ImageFolderData:
    """Scan ``root/<class>/<image>``; unreadable or non-image files are skipped with a warning and a count."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    if len(class_dirs) < 2:
        raise DataError(f"data folder {root} has one class ({class_dirs[0].name}); a classifier needs at least 2")
    candidates = [
        (index, path)
        for index, class_dir in enumerate(class_dirs)
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    ]
    data = ImageFolderData(root=root, classes=[d.name for d in class_dirs], paths=[], targets=[])
    _admit(data, candidates)
    for index, class_dir in enumerate(class_dirs):
        _check_class_size(data, index, f"class {class_dir.name!r}", root)
    _warn_skipped(data.skipped, root)
    return data


def _admit(data: ImageFolderData, candidates: Sequence[tuple[int, ImagePath]]) -> None:
    """Append the (class index, path) candidates that are readable images to ``data`` (paths, targets, file
    hashes), the others to ``data.skipped`` with the reason."""
    suffix = lambda p: Path(urlparse(p).path).suffix if isinstance(p, str) else p.suffix  # noqa: E731
    hashes = data._file_hashes if data._file_hashes is not None else []
    wanted = [(i, p) for i, p in candidates if suffix(p).lower() in IMAGE_SUFFIXES]
    data.skipped.extend(
        (p, f"not an image file (suffix {suffix(p)})") for _, p in candidates if suffix(p).lower() not in IMAGE_SUFFIXES
    )
    for (target, path), (reason, digest) in zip(wanted, _check_all([p for _, p in wanted])):
        if reason:
            data.skipped.append((path, reason))
        else:
            data.paths.append(path)
            data.targets.append(target)
            hashes.append(digest)
    data._file_hashes = hashes


def _check_class_size(data: ImageFolderData, index: int, what: str, where: object) -> None:
    count = data.targets.count(index)
    if count == 0:
        raise DataError(f"{what} in {where} has no readable images")
    if count < 2:
        raise DataError(
            f"{what} has {count} readable image; at least 2 are needed (one for training, one for validation)"
        )


def _warn_skipped(skipped: list[tuple[ImagePath, str]], where: object) -> None:
    if skipped:
        log.warning(
            "skipped %d unreadable or non-image files under %s (first: %s: %s)",
            len(skipped),
            where,
            skipped[0][0],
            skipped[0][1],
        )


def _readable_images(folder: Path, skipped: list[tuple[ImagePath, str]]) -> tuple[list[ImagePath], list[bytes]]:
    """Image files under ``folder`` (any depth, hidden files ignored) that decode as serving decodes them, and their
    sha256 digests; the others are appended to ``skipped`` with the reason."""
    found = ImageFolderData(folder, [UNLABELED], [], [])
    _admit(found, [(0, p) for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")])
    skipped.extend(found.skipped)
    return found.paths, found._file_hashes or []


UNLABELED = "(unlabeled)"


def load_unlabeled_folder(
    root: str | Path, labelled: ImageFolderData, what: str = "unlabelled folder"
) -> ImageFolderData:
    """Every readable image under ``root`` (any layout) as one class ``(unlabeled)``; DataError when there is none,
    or when ``root`` overlaps the labelled data (the same folder, or the same image bytes). ``what`` names the
    folder in messages (the --unlabeled or the --target one)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} {root} does not exist or is not a folder")
    if root.resolve().is_relative_to(labelled.root.resolve()) or labelled.root.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{what} {root} overlaps the labelled data {labelled.root}: keep them apart")
    skipped: list[tuple[ImagePath, str]] = []
    paths, hashes = _readable_images(root, skipped)
    if not paths:
        raise DataError(
            f"{what} {root} has no readable images"
            + (f" (skipped {len(skipped)}; first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
        )
    folder = ImageFolderData(
        root=root, classes=[UNLABELED], paths=paths, targets=[0] * len(paths), skipped=skipped, _file_hashes=hashes
    )
    known = set(labelled.file_hashes())
    shared = [p for p, file_hash in zip(paths, folder.file_hashes()) if file_hash in known]
    if shared:
        raise DataError(
            f"{len(shared)} images of the {what} {root} are also labelled images of {labelled.root} "
            f"(first: {shared[0]}): keep them apart"
        )
    _warn_skipped(skipped, root)
    return folder


LISTING_SUFFIXES = (".csv", ".parquet")
SPLITS = ("train", "val")


def load_data(source: str | Path) -> ImageFolderData:
    """`--data`: an ImageFolder, or a listing file (.csv or .parquet) read by :func:`load_listing`."""
    source = Path(source)
    if source.suffix.lower() in LISTING_SUFFIXES and not source.is_dir():
        return load_listing(source)
    return load_image_folder(source)


def _listing_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading a .parquet listing needs pyarrow: pip install 'tl-models[scale]'") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises its own types for files that are not Parquet
            raise DataError(f"listing {path} is not a readable Parquet file: {exc}") from None
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"listing {path} is not a readable CSV file: {exc}") from None


def _listing_location(value: str, base: Path) -> ImagePath:
    """A listing's ``path`` cell: relative to the listing's folder, absolute, ``file://`` or another fsspec URL."""
    parsed = urlparse(value)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if len(parsed.scheme) > 1:  # s3://, gs://, memory://, ... (a one-letter scheme is a Windows drive)
        return value
    return base / value


def load_listing(path: str | Path) -> ImageFolderData:
    """A listing file with columns ``path,label`` and an optional ``split`` (``train``/``val``, which replaces the
    random split). Rows with a missing or unreadable image or an empty label are skipped with a count, as in a
    folder; a listing without the columns, or with no usable row, is a DataError before anything is written."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"listing {path} does not exist or is not a file")
    rows = _listing_rows(path)
    columns = set(rows[0]) if rows else set()
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DataError(
            f"listing {path} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(sorted(columns)) or 'none'}): it needs path,label and optionally split"
        )
    with_split = "split" in columns
    skipped: list[tuple[ImagePath, str]] = []
    kept: list[tuple[str, ImagePath, str]] = []
    for number, row in enumerate(rows, start=2):  # line 1 of a CSV is the header
        label = str(row.get("label") or "").strip()
        cell = str(row.get("path") or "").strip()
        split = str(row.get("split") or "").strip().lower() if with_split else ""
        if not cell:
            skipped.append((f"row {number}", "empty path"))
        elif not label:
            skipped.append((cell, f"row {number}: empty label"))
        elif with_split and split not in SPLITS:
            skipped.append((cell, f"row {number}: split {split!r} is neither train nor val"))
        else:
            kept.append((label, _listing_location(cell, path.parent), split))
    classes = sorted({label for label, _, _ in kept})
    if len(classes) < 2:
        raise DataError(
            f"listing {path} has {len(classes)} label(s) with a usable row; a classifier needs at least 2"
            + (f" (skipped {len(skipped)}; first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
        )
    data = ImageFolderData(
        root=path, classes=classes, paths=[], targets=[], skipped=skipped, splits=[] if with_split else None
    )
    split_of = {location: split for _, location, split in kept}
    _admit(data, [(classes.index(label), location) for label, location, _ in kept])
    if data.splits is not None:
        data.splits = [split_of[p] for p in data.paths]
        for side in SPLITS:
            sided = {t for t, s in zip(data.targets, data.splits) if s == side}
            if not sided:
                raise DataError(f"listing {path} has no readable {side} image: its split column needs both sides")
    for index, label in enumerate(classes):
        _check_class_size(data, index, f"label {label!r}", path)
    _warn_skipped(data.skipped, path)
    return data


def stratified_split(targets: list[int], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, val): each class split with ``val_fraction`` in val (at least one each side), seeded."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val fraction must be between 0 and 1, got {val_fraction}")
    rng = random.Random(seed)
    train, val = [], []
    for cls in sorted(set(targets)):
        members = [i for i, t in enumerate(targets) if t == cls]
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train), sorted(val)


def write_demo_dataset(out: str | Path, size: int = 64, per_class: int | None = None) -> Path:
    """Write scikit-learn's handwritten digits (1,797 real 8×8 scans, 10 classes) as an upscaled ImageFolder."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    counts: dict[int, int] = {}
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and counts.get(int(target), 0) >= per_class:
            continue
        counts[int(target)] = counts.get(int(target), 0) + 1
        image = Image.fromarray(np.uint8(pixels * (255.0 / 16.0))).resize((size, size), Image.Resampling.BILINEAR)
        path = out / str(int(target)) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(path)
    return out


DEMO_SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {  # domain shifts of the demo digits (RGB, float)
    "inverted": lambda pixels: 255 - pixels,
    "tinted": lambda pixels: 0.5 * pixels + 0.5 * np.array([255, 140, 0]),
}


def shifted_image(path: str | Path | BinaryIO, shift: str) -> Image.Image:
    """An image with one of :data:`DEMO_SHIFTS` applied (the target domain of the methods and judging demos)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.clip(DEMO_SHIFTS[shift](pixels), 0, 255).astype(np.uint8))
