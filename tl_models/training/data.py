"""ImageFolder input (class = sub-folder name), seeded stratified split, and the demo data set."""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..core.errors import BadRequest
from ..core.preprocess import ImageError, decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DataError(BadRequest):
    """The data folder cannot be used for training; the message says why."""


@dataclass
class ImageFolderData:
    """Readable images of an ImageFolder, their class indices, and what was skipped and why."""

    root: Path
    classes: list[str]
    paths: list[Path]
    targets: list[int]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    _hash: str | None = field(default=None, repr=False)
    _file_hashes: list[bytes] | None = field(default=None, repr=False)

    def file_hashes(self) -> list[bytes]:
        """sha256 digest of every image file, in ``paths`` order (read once)."""
        if self._file_hashes is None:
            self._file_hashes = [hashlib.sha256(path.read_bytes()).digest() for path in self.paths]
        return self._file_hashes

    def content_hash(self) -> str:
        """sha256 over (relative path, class, file sha256) of every image: the data part of the cache key."""
        if self._hash is None:
            digest = hashlib.sha256()
            for path, target, file_hash in zip(self.paths, self.targets, self.file_hashes()):
                digest.update(f"{path.relative_to(self.root)}\0{self.classes[target]}\0".encode())
                digest.update(file_hash)
            self._hash = digest.hexdigest()
        return self._hash


def _check_image(path: Path) -> str | None:
    """None when the file decodes as serving decodes it (``tl_models.core.preprocess``), else the reason it does not:
    training skips what the servers would refuse (unreadable, truncated, too small, too large, needle-shaped)."""
    try:
        decode_image(path.read_bytes())
    except (ImageError, OSError) as exc:
        return str(exc)
    return None


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
    data = ImageFolderData(root=root, classes=[d.name for d in class_dirs], paths=[], targets=[])
    for index, class_dir in enumerate(class_dirs):
        paths = _readable_images(class_dir, data.skipped)
        data.paths.extend(paths)
        data.targets.extend([index] * len(paths))
        count = len(paths)
        if count == 0:
            raise DataError(f"class {class_dir.name!r} in {root} has no readable images")
        if count < 2:
            raise DataError(f"class {class_dir.name!r} has {count} readable image; at least 2 are needed "
                            "(one for training, one for validation)")
    if data.skipped:
        log.warning("skipped %d unreadable or non-image files under %s (first: %s: %s)",
                    len(data.skipped), root, data.skipped[0][0], data.skipped[0][1])
    return data


def _readable_images(folder: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Image files under ``folder`` (any depth, hidden files ignored) that decode as serving decodes them; the
    others are appended to ``skipped`` with the reason."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            continue
        reason = ("not an image file (suffix %s)" % path.suffix) if path.suffix.lower() not in IMAGE_SUFFIXES \
            else _check_image(path)
        if reason:
            skipped.append((path, reason))
        else:
            found.append(path)
    return found


UNLABELED = "(unlabeled)"


def load_unlabeled_folder(root: str | Path, labelled: ImageFolderData,
                          what: str = "unlabelled folder") -> ImageFolderData:
    """Every readable image under ``root`` (any layout) as one class ``(unlabeled)``; DataError when there is none,
    or when ``root`` overlaps the labelled data (the same folder, or the same image bytes). ``what`` names the
    folder in messages (the --unlabeled or the --target one)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} {root} does not exist or is not a folder")
    if root.resolve().is_relative_to(labelled.root.resolve()) or labelled.root.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{what} {root} overlaps the labelled data {labelled.root}: keep them apart")
    skipped: list[tuple[Path, str]] = []
    paths = _readable_images(root, skipped)
    if not paths:
        raise DataError(f"{what} {root} has no readable images" +
                        (f" (skipped {len(skipped)}; first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    folder = ImageFolderData(root=root, classes=[UNLABELED], paths=paths, targets=[0] * len(paths), skipped=skipped)
    known = set(labelled.file_hashes())
    shared = [p for p, file_hash in zip(paths, folder.file_hashes()) if file_hash in known]
    if shared:
        raise DataError(f"{len(shared)} images of the {what} {root} are also labelled images of {labelled.root} "
                        f"(first: {shared[0]}): keep them apart")
    if skipped:
        log.warning("skipped %d unreadable or non-image files under %s (first: %s: %s)", len(skipped), root,
                    skipped[0][0], skipped[0][1])
    return folder


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


def shifted_image(path: str | Path, shift: str) -> Image.Image:
    """An image with one of :data:`DEMO_SHIFTS` applied (the target domain of the methods and judging demos)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.clip(DEMO_SHIFTS[shift](pixels), 0, 255).astype(np.uint8))
