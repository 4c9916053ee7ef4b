"""A build's own backbone: its module from the build's ``backbone.pt`` (no download: the build is self-contained)
and the engine that embeds images with it. Shared by the pipeline and `build --from-log`."""

from __future__ import annotations

from ..core.errors import BadRequest
from ..core.manifest import BuildDir, Manifest
from ..core.names import BACKBONE_ONNX, BACKBONE_PT
from ..core.preprocess import Preprocessing
from .backbones import LoadedBackbone, get_spec, load_saved_backbone
from .export import build_metadata, export_backbone
from .extract import Engine, OrtEngine, StreamEngine, TorchEngine, extraction_sessions, resolve_device, resolve_engine
from .options import BuildOptions


def load_build_backbone(build_dir: BuildDir, manifest: Manifest) -> LoadedBackbone:
    """The build's backbone with its saved state_dict (no download: the build is self-contained)."""
    return load_saved_backbone(
        manifest.backbone,
        build_dir.file(BACKBONE_PT),
        manifest.weights,
        Preprocessing.from_dict(manifest.preprocessing),
    )


def extraction_engine(
    options: BuildOptions, build_dir: BuildDir, manifest: Manifest, backbone: LoadedBackbone
) -> tuple[Engine | StreamEngine, bool]:
    """The engine that embeds this build's images, and whether it exported the build's backbone.onnx just now
    (a first build on ONNX Runtime: exported before extraction, so that heads train on the graph serving runs)."""
    device = resolve_device(options.device)
    engine = resolve_engine(options.engine, device)
    has_onnx = BACKBONE_ONNX in manifest.top_files
    if engine == "onnxruntime" and not has_onnx and not options.export:
        if options.engine == "onnxruntime":
            raise BadRequest(
                "--engine onnxruntime extracts with the build's backbone.onnx, which --no-export "
                "does not write: drop one of them"
            )
        engine = "torch"
    if engine == "torch" and options.ray is None:
        return TorchEngine(backbone, device), False
    path = build_dir.path / BACKBONE_ONNX
    if not has_onnx:
        export_backbone(
            backbone.module,
            manifest.input_size,
            path,
            build_metadata(manifest),
            get_spec(manifest.backbone).onnx_exporter,
        )
    if options.ray is not None:
        from .distributed import RayEngine, connect

        connect(options.ray)  # joined already by build(); `build --from-log --data` joins here
        return RayEngine(path, device, options.ray_actors), not has_onnx
    return OrtEngine(path, device, extraction_sessions()), not has_onnx
