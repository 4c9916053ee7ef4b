"""Serving preprocessing (numpy/PIL only) against torchvision's eval transform, and its bad-input errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from tl_models.core.preprocess import (
    ImageError,
    decode_image,
    normalize,
    preprocess_bytes,
    preprocess_file,
    transform_image,
)
from tl_models.training.backbones import get_spec


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "backbone, weights",
    [
        ("mobilenet_v2", "IMAGENET1K_V1"),
        ("efficientnet_b0", "IMAGENET1K_V1"),
        ("convnext_tiny", "IMAGENET1K_V1"),
        ("resnet50", "IMAGENET1K_V2"),
    ],
)
@pytest.mark.parametrize("photo", ["chelsea", "astronaut", "coffee"])
def test_matches_torchvision_eval_transform(backbone, weights, photo):
    """Same tensor as torchvision's ImageClassification transform (bilinear and bicubic, non-square images)."""
    spec = get_spec(backbone)
    member = spec.weights_enum[weights]
    image = Image.fromarray(getattr(skdata, photo)()).convert("RGB")
    expected = member.transforms()(image).numpy()
    ours = normalize(transform_image(image, spec.preprocessing(member))[None], spec.preprocessing(member))[0]
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_training_and_serving_paths_give_identical_tensors(tmp_path):
    spec = get_spec("mobilenet_v2").preprocessing()
    path = tmp_path / "cat.jpg"
    Image.fromarray(skdata.chelsea()).save(path, quality=90)
    from_file = preprocess_file(path, spec)  # what feature extraction uses
    from_bytes = preprocess_bytes(path.read_bytes(), spec)  # what BentoML and Triton use
    assert from_file.dtype == np.uint8 and from_file.shape == (3, 224, 224)
    assert np.array_equal(from_file, from_bytes)


def test_backbone_graph_normalisation_matches_numpy():
    """The normalisation inside the backbone module is the arithmetic of preprocess.normalize."""
    from tl_models.training.backbones import NormalizedBackbone

    spec = get_spec("mobilenet_v2").preprocessing()
    module = NormalizedBackbone(torch.nn.Identity(), spec)
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    np.testing.assert_allclose(module(torch.from_numpy(batch)).numpy(), normalize(batch, spec), atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_odd_modes_are_converted(mode):
    image = Image.fromarray(skdata.chelsea()).convert("RGB").convert(mode if mode != "I;16" else "I")
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = preprocess_bytes(encoded(image, fmt), get_spec("mobilenet_v2").preprocessing())
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8 and out.std() > 5


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    assert decode_image(encoded(image, "JPEG", exif=exif)).size == (20, 40)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty input"),
        (b"this is not an image at all", "not an image"),
        (np.random.default_rng(0).bytes(4096), "not an image"),
    ],
)
def test_bad_bytes_raise_image_error(payload, message):
    with pytest.raises(ImageError, match=message):
        preprocess_bytes(payload, get_spec("mobilenet_v2").preprocessing())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_raise_image_error(fmt):
    data = encoded(Image.fromarray(skdata.chelsea()), fmt)
    with pytest.raises(ImageError):
        preprocess_bytes(data[: len(data) // 2], get_spec("mobilenet_v2").preprocessing())


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encoded(Image.new("1", (20000, 20000)))  # 400 Mpixel, a few hundred kB on the wire
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageError, match="too large: .*400000000 pixels"):
        decode_image(bomb)


def test_pixel_limit_is_configurable():
    data = encoded(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageError, match="exceeds the limit of 5000 pixels"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10000).size == (100, 100)


@pytest.mark.parametrize(
    "size, message", [((1, 1), "too small: 1x1"), ((7, 300), "too small"), ((10, 1001), "aspect ratio beyond 100:1")]
)
def test_tiny_and_needle_shaped_images_are_refused(size, message):
    with pytest.raises(ImageError, match=message):
        decode_image(encoded(Image.new("RGB", size)))
    assert decode_image(encoded(Image.new("RGB", (8, 800)))).size == (8, 800)
