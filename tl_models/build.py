"""The build pipeline: ImageFolder -> frozen backbone features (cached) -> trained head -> build directory."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .artifacts import BuildDir, BuildError, atomic_save_torch, atomic_write_json
from .backbones import LoadedBackbone, get_spec, load_backbone, unfreeze_last_stage
from .export import (BACKBONE_FP16, BACKBONE_ONNX, FUSED_FP16, FUSED_ONNX, HEAD_ONNX, build_metadata, export_backbone,
                     export_head, fuse, to_fp16)
from .parity import BATCH_SIZES, FP16, ParityReport, Tolerance, run_parity
from .runtime import gpu_count
from .data import load_image_folder, stratified_split
from .features import FeatureCache, default_cache_dir, load_images
from .heads import HeadSpec, build_head
from .preprocess import Preprocessing
from .plots import plot_confusion, plot_curves
from .train import TrainConfig, fit

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
BACKBONE_FILE = "backbone.pt"


def check_name(name: str, what: str = "name") -> str:
    """Names become paths and Triton model names: letters, digits, '_' and '-', at most 64 characters."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '_' or '-' (at most 64, no leading '-')")
    return name


@dataclass
class BuildOptions:
    """Everything `tl-models build` takes."""

    data: Path
    out: Path
    backbone: str = "mobilenet_v2"
    weights: str = "DEFAULT"
    head: str = "linear"
    name: str = "default"
    hidden: int = 512
    dropout: float = 0.0
    unfreeze_last: bool = False
    val_fraction: float = 0.2
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: Path | None = None
    progress: bool = True
    export: bool = True
    tolerance: Tolerance = field(default_factory=Tolerance)


@dataclass
class BuildReport:
    """What a build produced: the head entry, whether the feature cache was hit, the manifest."""

    head: dict
    cache_hit: bool
    manifest: dict


def _library_versions() -> dict:
    import torchvision

    return {"tl_models": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def _new_manifest(options: BuildOptions, backbone: LoadedBackbone, labels: list[str]) -> dict:
    prep = backbone.preprocessing
    return {
        "format_version": 1,
        "name": check_name(re.sub(r"[^A-Za-z0-9_-]", "_", options.out.resolve().name), "build name"),
        "backbone": backbone.spec.name,
        "weights": backbone.weights_id,
        "embedding_dim": backbone.spec.embedding_dim,
        "input_size": [3, prep.crop_size, prep.crop_size],
        "mean": list(prep.mean),
        "std": list(prep.std),
        "preprocessing": prep.to_dict(),
        "labels": labels,
        "heads": [],
        "top_files": [BACKBONE_FILE],
        "files": {},
        "versions": _library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _check_compatible(manifest: dict, options: BuildOptions, backbone: LoadedBackbone, labels: list[str]) -> None:
    if manifest["backbone"] != backbone.spec.name or manifest["weights"] != backbone.weights_id:
        raise BuildError(f"{options.out} holds heads for {manifest['backbone']} with weights {manifest['weights']}, "
                         f"not {backbone.spec.name} with {backbone.weights_id}: heads share one backbone, "
                         "use another --out")
    if manifest["labels"] != labels:
        raise BuildError(f"{options.out} has labels {manifest['labels']}, the data has {labels}: "
                         "heads of one build share their labels, use another --out")
    if options.unfreeze_last:
        raise BuildError("--unfreeze-last fine-tunes the backbone, which the heads already in "
                         f"{options.out} share: use a new --out")
    if any(head["train"].get("unfreeze_last") for head in manifest["heads"]):
        raise BuildError(f"{options.out} holds a backbone fine-tuned with --unfreeze-last; a new head would train "
                         f"on features of the original {backbone.weights_id} weights: use a new --out")


def build(options: BuildOptions) -> BuildReport:
    """Train one head and commit it into the build directory (a new head, or a new version of one)."""
    check_name(options.name, "head name")
    data = load_image_folder(options.data)
    backbone = load_backbone(options.backbone, options.weights, seed=options.train.seed)
    build_dir = BuildDir(options.out)
    with build_dir.lock():
        build_dir.clean_staging()
        manifest = build_dir.manifest() if build_dir.exists() else None
        if manifest is not None:
            _check_compatible(manifest, options, backbone, data.classes)
            build_dir.verify(manifest)
        spec = HeadSpec(options.head, backbone.spec.embedding_dim, len(data.classes), options.hidden, options.dropout)
        train_idx, val_idx = stratified_split(data.targets, options.val_fraction, options.train.seed)
        targets = torch.tensor(data.targets)
        torch.manual_seed(options.train.seed)
        head = build_head(spec)
        cache_hit = False
        if options.unfreeze_last:
            inputs = torch.from_numpy(load_images(data, backbone.preprocessing, options.progress))
            unfreeze_last_stage(backbone)
            embedder = backbone.module
        else:
            cache = FeatureCache(options.cache_dir or default_cache_dir())
            features, cache_hit = cache.get_or_compute(backbone, data, progress=options.progress)
            inputs, embedder = torch.from_numpy(features), None
        result = fit(head, inputs[train_idx], targets[train_idx], inputs[val_idx], targets[val_idx],
                     options.train, embedder=embedder, progress=options.progress)
        if manifest is None:
            manifest = _new_manifest(options, backbone, data.classes)
            atomic_save_torch(build_dir.path / BACKBONE_FILE, backbone.module.state_dict())
        version = build_dir.next_version(options.name, manifest)
        staged = build_dir.staging_dir()
        try:
            entry = _stage_head(staged, options, spec, version, result, data, len(train_idx), len(val_idx), cache_hit)
            if options.export:
                new_backbone = BACKBONE_ONNX not in manifest["top_files"]
                report = export_and_check(build_dir, manifest, backbone.module, [(entry, head, staged)],
                                          new_backbone, options.tolerance)
                if new_backbone:
                    manifest["top_files"].append(BACKBONE_ONNX)
                entry["files"] = sorted(p.name for p in staged.iterdir())
                entry["parity"] = {"passed": report.passed, "max_abs_diff": max(c.max_abs_diff for c in report.checks)}
            manifest["heads"].append(entry)
            manifest = build_dir.commit(manifest, staged, entry["path"])
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    log.info("head %s v%d: val accuracy %.4f", options.name, version, result.metrics["val_accuracy"])
    return BuildReport(entry, cache_hit, manifest)


def _stage_head(staged: Path, options: BuildOptions, spec: HeadSpec, version: int, result, data,
                n_train: int, n_val: int, cache_hit: bool) -> dict:
    atomic_save_torch(staged / "head.pt", result.head_state)
    (staged / "history.json").write_text(json.dumps(result.history, indent=1))
    plot_curves(result.history, staged / "curves.png")
    plot_confusion(result.metrics["confusion_matrix"], data.classes, staged / "confusion.png")
    return {
        "name": options.name,
        "version": version,
        "kind": spec.kind,
        "spec": spec.to_dict(),
        "path": f"heads/{options.name}/{version}",
        "files": sorted(p.name for p in staged.iterdir()),
        "metrics": result.metrics,
        "train": {**options.train.__dict__, "unfreeze_last": options.unfreeze_last, "feature_cache_hit": cache_hit},
        "data": {"root": str(data.root), "content_hash": data.content_hash(), "images": len(data.paths),
                 "train": n_train, "val": n_val, "skipped": len(data.skipped)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_and_check(build_dir: BuildDir, manifest: dict, backbone: torch.nn.Module,
                     heads: list[tuple[dict, torch.nn.Module, Path]], with_backbone: bool,
                     tolerance: Tolerance, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> ParityReport:
    """Export backbone.onnx (if ``with_backbone``) and each head's head.onnx + model.onnx into its folder, then
    run parity on what was exported; ParityError past tolerance. Each head folder gets its parity.json."""
    backbone_path = build_dir.path / BACKBONE_ONNX
    if with_backbone:
        export_backbone(backbone, manifest["input_size"], backbone_path, build_metadata(manifest),
                        get_spec(manifest["backbone"]).onnx_exporter)
    graphs = {}
    for entry, head, folder in heads:
        meta = build_metadata(manifest, entry)
        export_head(head, manifest["embedding_dim"], folder / HEAD_ONNX, meta)
        fuse(backbone_path, folder / HEAD_ONNX, folder / FUSED_ONNX, meta)
        graphs[f"{entry['name']}:{entry['version']}"] = (head, str(folder / HEAD_ONNX), str(folder / FUSED_ONNX))
    report = run_parity(backbone, manifest["input_size"], str(backbone_path) if with_backbone else None, graphs,
                        tolerance, batch_sizes)
    for entry, _, folder in heads:
        label = f"{entry['name']}:{entry['version']}"
        own = [c for c in report.checks if c.graph == "backbone" or c.graph.startswith(label + "/")]
        atomic_write_json(folder / "parity.json", ParityReport(tolerance, own, report.providers).to_dict())
    log.info("parity (PyTorch vs ONNX Runtime):\n%s", report.table())
    report.raise_on_failure()
    return report


def reexport(path: str | Path, tolerance: Tolerance = Tolerance(), fp16: bool = False) -> ParityReport:
    """`tl-models export`: export every graph of a build again (and fp16 copies of the backbone and fused graphs
    when ``fp16``); files are swapped in only after parity passes."""
    build_dir = BuildDir(path)
    with build_dir.lock():
        manifest = build_dir.manifest()
        build_dir.verify(manifest)
        backbone = load_build_backbone(build_dir, manifest)
        scratch = build_dir.staging_dir()
        try:
            folders = {e["path"]: scratch / e["path"] for e in manifest["heads"]}
            for folder in folders.values():
                folder.mkdir(parents=True)
            heads = [(e, load_head_module(build_dir, e), folders[e["path"]]) for e in manifest["heads"]]
            report = export_and_check(BuildDir(scratch), manifest, backbone.module, heads, True, tolerance)
            top = [BACKBONE_ONNX] + ([BACKBONE_FP16] if fp16 else [])
            if fp16:
                export_fp16(scratch, manifest, backbone.module, heads)
            rewritten = list(top)
            for rel, folder in folders.items():
                for file in folder.iterdir():
                    rewritten.append(f"{rel}/{file.name}")
                entry = next(e for e in manifest["heads"] if e["path"] == rel)
                entry["files"] = sorted(set(entry["files"]) | {f.name for f in folder.iterdir()})
            for rel in rewritten:
                os.replace(scratch / rel, build_dir.path / rel)
            manifest["top_files"] += [name for name in top if name not in manifest["top_files"]]
            build_dir.commit(manifest, rewritten=tuple(rewritten))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def export_fp16(root: Path, manifest: dict, backbone: torch.nn.Module,
                heads: list[tuple[dict, torch.nn.Module, Path]]) -> ParityReport | None:
    """backbone.fp16.onnx and each head's model.fp16.onnx from the fp32 graphs under ``root``; their parity
    (within 1% of the largest output, top-1 agreement >= 99%) is checked where a GPU runs them, else skipped."""
    to_fp16(root / BACKBONE_ONNX, root / BACKBONE_FP16, {})
    graphs = {}
    for entry, head, folder in heads:
        to_fp16(folder / FUSED_ONNX, folder / FUSED_FP16, {})
        graphs[f"{entry['name']}:{entry['version']}"] = (head, str(folder / HEAD_ONNX), str(folder / FUSED_FP16))
    if gpu_count() == 0:
        log.warning("fp16 parity skipped: no GPU here, and fp16 is for GPU serving (CPU kernels are slow or missing)")
        return None
    report = run_parity(backbone, manifest["input_size"], str(root / BACKBONE_FP16), graphs, Tolerance(**FP16))
    log.info("fp16 parity (PyTorch fp32 vs ONNX Runtime fp16):\n%s", report.table())
    report.raise_on_failure()
    return report


def check_parity(path: str | Path, tolerance: Tolerance = Tolerance(),
                 batch_sizes: tuple[int, ...] = BATCH_SIZES) -> ParityReport:
    """`tl-models parity`: compare a build's ONNX files against its PyTorch modules; writes parity.json."""
    build_dir = BuildDir(path)
    manifest = build_dir.manifest()
    build_dir.verify(manifest)
    if BACKBONE_ONNX not in manifest["top_files"]:
        raise BuildError(f"{path} has no ONNX export; run `tl-models export {path}`")
    backbone = load_build_backbone(build_dir, manifest)
    graphs = {f"{e['name']}:{e['version']}": (load_head_module(build_dir, e), str(build_dir.path / e["path"] / HEAD_ONNX),
                                              str(build_dir.path / e["path"] / FUSED_ONNX)) for e in manifest["heads"]}
    report = run_parity(backbone.module, manifest["input_size"], str(build_dir.path / BACKBONE_ONNX), graphs,
                        tolerance, batch_sizes)
    atomic_write_json(build_dir.path / "parity.json", report.to_dict())
    return report


def load_head_module(build_dir: BuildDir, entry: dict) -> torch.nn.Module:
    """Rebuild a committed head from its spec and state_dict (weights_only load)."""
    head = build_head(HeadSpec.from_dict(entry["spec"]))
    head.load_state_dict(torch.load(build_dir.path / entry["path"] / "head.pt", map_location="cpu", weights_only=True))
    return head.eval()


def load_build_backbone(build_dir: BuildDir, manifest: dict) -> LoadedBackbone:
    """The build's backbone with its saved state_dict (no download: the build is self-contained)."""
    backbone = load_backbone(manifest["backbone"], "none")
    state = torch.load(build_dir.path / BACKBONE_FILE, map_location="cpu", weights_only=True)
    backbone.module.load_state_dict(state)
    backbone.weights_id = manifest["weights"]
    backbone.preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    return backbone


def summary_line(report: BuildReport) -> str:
    """One line for the terminal."""
    head = report.head
    acc = head["metrics"]["val_accuracy"]
    return (f"{head['name']} v{head['version']} ({head['kind']}) on {report.manifest['backbone']} "
            f"[{report.manifest['weights']}]: val accuracy {acc:.4f} "
            f"(feature cache {_cache_word(report)})")


def _cache_word(report: BuildReport) -> str:
    if report.head["train"]["unfreeze_last"]:
        return "not used: --unfreeze-last"
    return "hit" if report.cache_hit else "miss"

