"""Image bytes -> model input with numpy and PIL only (no torch), shared by training, BentoML and Triton.

The pipeline reproduces torchvision's ``ImageClassification`` eval transform on PIL images exactly:
resize the shorter side, centre-crop, keep uint8 RGB (normalisation lives inside the backbone graph).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadRequest

DEFAULT_MAX_PIXELS = 40_000_000
MIN_SIDE = 8  # pixels: anything smaller carries no picture worth classifying
MAX_ASPECT_RATIO = 100  # longer side / shorter side: resizing the shorter side must not blow up the longer
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(BadRequest):
    """An input that cannot be turned into a model input: not an image, truncated, empty or too large."""


@dataclass(frozen=True)
class Preprocessing:
    """Eval transform of a backbone: resize shorter side, centre-crop, then normalise inside the graph."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            resize_size=int(data["resize_size"]),
            crop_size=int(data["crop_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bilinear"),
        )


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (EXIF rotation applied); raise ImageError on bad input."""
    image = _open_checked(data, max_pixels)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an image with nothing to turn
        return image.convert("RGB") if image.mode != "RGB" else image
    except Exception as exc:
        raise ImageError(f"cannot decode image ({image.format}): {exc}") from None


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise the ImageError :func:`decode_image` would raise, else nothing. A JPEG decodes at 1/8 scale here (its
    whole entropy-coded data is still read, so truncated or corrupt files are still found), a quarter faster."""
    image = _open_checked(data, max_pixels)
    try:
        if image.format == "JPEG":
            image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        image.load()
    except Exception as exc:
        raise ImageError(f"cannot decode image ({image.format}): {exc}") from None


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header opened and its size checked against the limits the servers apply."""
    if not data:
        raise ImageError("empty input: expected encoded image bytes (JPEG or PNG)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc} (limit {max_pixels} pixels)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image: the bytes are not a format PIL can decode (send JPEG or PNG)") from None
    except Exception as exc:  # PIL raises many types for malformed headers
        raise ImageError(f"cannot read image header: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image too small: {width}x{height} (each side needs at least {MIN_SIDE} pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"image {width}x{height} has an aspect ratio beyond {MAX_ASPECT_RATIO}:1")
    return image


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's rule: the shorter side becomes ``size``, the longer keeps the aspect ratio (truncated)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def transform_image(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Resize + centre-crop an RGB PIL image; returns uint8 CHW (3×crop×crop)."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    new_w, new_h = _resized_size(*image.size, spec.resize_size)
    image = image.resize((new_w, new_h), resample=_RESAMPLE[spec.interpolation])
    crop = spec.crop_size
    if new_w < crop or new_h < crop:
        raise ImageError(f"image {new_w}x{new_h} is smaller than the crop {crop} after resizing")
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    pixels = np.empty((3, crop, crop), dtype=np.uint8)
    for plane, band in zip(pixels, image.split()):  # PIL's planes side by side: half the time of a transpose
        plane[...] = np.asarray(band)
    return pixels


def preprocess_bytes(data: bytes, spec: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 CHW model input."""
    return transform_image(decode_image(data, max_pixels), spec)


def preprocess_many(items: Iterable[bytes], spec: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Several encoded images -> uint8 N×3×H×W; ImageError for the first that is not a usable image."""
    return np.stack([preprocess_bytes(bytes(item), spec, max_pixels) for item in items])


def preprocess_file(path: str | Path, spec: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file -> uint8 CHW model input."""
    return preprocess_bytes(Path(path).read_bytes(), spec, max_pixels)


def normalize(batch: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 N×3×H×W -> float32 normalised batch, the same arithmetic the backbone graph applies."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255.0
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1) * 255.0
    normalised: np.ndarray = (batch.astype(np.float32) - mean) / std
    return normalised


def blank_image(size: int = 32, image_format: str = "PNG") -> bytes:
    """A grey ``size``×``size`` image, encoded: warm-up input of the servers (it loads PIL's decoders early)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format=image_format)
    return buffer.getvalue()


def tensor_problem(array: np.ndarray, name: str, dims: tuple[int, ...], dtype: np.dtype | None = None) -> str | None:
    """Why ``array`` is not a batch N×``dims`` (-1: any size) of numbers (of ``dtype`` when given, finite when
    float), or None when it is."""
    if dtype is not None and array.dtype != dtype:
        return f"{name} must be {np.dtype(dtype).name}, got {array.dtype.name}"
    if array.ndim != len(dims) + 1 or any(d != -1 and d != s for d, s in zip(dims, array.shape[1:])):
        expected = "×".join("?" if d == -1 else str(d) for d in dims)
        return f"{name} must have shape N×{expected}, got {list(array.shape)}"
    if array.dtype.kind not in "iuf":
        return f"{name} must hold numbers, got dtype {array.dtype}"
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return f"{name} holds NaN or infinite values"
    return None
