"""Generated bad requests (and valid but odd images) for the reliability tests, shared by every server's tests.

Each :class:`Bad` carries its payload and a regular expression the server's error message must match, so a
test checks both that the request was refused and that the answer says what was wrong. Payloads are images
(encoded bytes) or tensors; the test of each server turns them into that server's requests.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

# what a refused image's message says (tl_models.core.preprocess.ImageError texts)
NOT_AN_IMAGE = r"not an image|cannot (read|decode) image|truncated"


@dataclass(frozen=True)
class Bad:
    """One bad input: ``kind`` (for the tally), the payload, and a regex its error message must match."""

    kind: str
    payload: bytes | np.ndarray
    expect: str


def encode(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    """A PIL image as encoded bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noise_image(rng: np.random.Generator, width: int = 64, height: int = 48) -> Image.Image:
    """An RGB image of random pixels (compresses badly, so every truncation cuts pixel data)."""
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def declared_png(width: int, height: int, rows: int = 4) -> bytes:
    """A small, well-formed PNG header declaring ``width``×``height`` (a decompression bomb when large): only the
    first ``rows`` rows of pixel data are written, so neither this function nor a careful server allocates it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    pixels = zlib.compress(b"\0" * (min(rows, height) * (width + 1)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def bad_images(rng: np.random.Generator, count: int) -> Iterator[Bad]:
    """``count`` encoded-image payloads that no server may accept, cycling through every kind."""
    png, jpeg = encode(noise_image(rng)), encode(noise_image(rng), "JPEG", quality=90)
    kinds = [
        lambda: Bad("random bytes", rng.bytes(int(rng.integers(1, 4096))), NOT_AN_IMAGE),
        lambda: Bad("text", b"hello, " + rng.bytes(8).hex().encode(), NOT_AN_IMAGE),
        lambda: Bad("truncated png", png[: int(len(png) * rng.uniform(0.02, 0.95))], NOT_AN_IMAGE),
        lambda: Bad("truncated jpeg", jpeg[: int(len(jpeg) * rng.uniform(0.02, 0.95))], NOT_AN_IMAGE),
        lambda: Bad("empty", b"", r"empty"),
        lambda: Bad(
            "tiny image", encode(Image.new("RGB", (int(rng.integers(1, 8)), int(rng.integers(1, 8))))), r"too small"
        ),
        lambda: Bad("decompression bomb", declared_png(20000, 20000), r"too large"),
        lambda: Bad("over the pixel limit", declared_png(int(rng.integers(6400, 12000)), 7000), r"too large"),
        lambda: Bad("extreme aspect ratio", declared_png(int(rng.integers(8, 40)), 60000), r"aspect ratio"),
        lambda: Bad("png signature only", b"\x89PNG\r\n\x1a\n" + rng.bytes(int(rng.integers(0, 64))), NOT_AN_IMAGE),
    ]
    for index in range(count):
        yield kinds[index % len(kinds)]()


def bad_tensors(
    rng: np.random.Generator, count: int, input_size: tuple[int, int, int], max_batch: int
) -> Iterator[Bad]:
    """``count`` tensor payloads that no server may accept: wrong shape, wrong dtype, NaN/Inf, too many images."""
    channels, height, width = input_size

    def wrong_shape() -> Bad:
        while True:
            shape = tuple(int(d) for d in rng.integers(1, 6, size=int(rng.integers(1, 6))))
            if shape[-3:] != input_size:
                return Bad("wrong shape", np.zeros(shape, np.uint8), shape_message)

    def non_finite() -> Bad:
        tensor = np.full((1, channels, height, width), 128.0, np.float32)
        tensor.flat[int(rng.integers(0, tensor.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return Bad("NaN/Inf tensor", tensor, r"holds NaN or infinite values|" + triton_type("FP32"))

    # each alternative is one server's exact words: ours (tl_models.core.preprocess.tensor_problem, the BentoML
    # engine) or Triton's frontend, which checks a tensor input's data type and shape against the model config
    shape_message = (
        rf"must have shape N×{channels}×{height}×{width}, got \[|"
        rf"unexpected shape for input 'image' for model '\w+'\. Expected \[-1,{channels},{height},{width}\]"
    )

    def triton_type(sent: str) -> str:
        return rf"data-type is '{sent}', but model '\w+' expects 'UINT8'"

    kinds = [
        wrong_shape,
        lambda: Bad(
            "wrong dtype",
            np.full((1, channels, height, width), "x", dtype=np.str_),
            r"must hold numbers, got dtype <U|" + triton_type("BYTES"),
        ),
        lambda: Bad(
            "wrong dtype",
            np.zeros((1, channels, height, width), np.complex64),
            r"must hold numbers, got dtype <U|" + triton_type("FP64"),
        ),
        non_finite,
        lambda: Bad(
            "batch over the maximum",
            np.zeros((max_batch + 1, channels, height, width), np.uint8),
            rf"tensor batch must hold 1 to {max_batch} images, got {max_batch + 1}|"
            rf"batch-size must be <= {max_batch}",
        ),
    ]
    for index in range(count):
        yield kinds[index % len(kinds)]()


def odd_images(rng: np.random.Generator) -> dict[str, bytes]:
    """Valid images in unusual forms that must be converted and answered, not refused."""
    base = noise_image(rng, 80, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return {
        "grayscale png": encode(base.convert("L")),
        "cmyk jpeg": encode(base.convert("CMYK"), "JPEG"),
        "rgba png": encode(base.convert("RGBA")),
        "palette png": encode(base.convert("P")),
        "16-bit grayscale png": encode(Image.fromarray(rng.integers(0, 65535, (60, 80), dtype=np.uint16))),
        "exif-rotated jpeg": encode(base, "JPEG", exif=exif.tobytes()),
    }
