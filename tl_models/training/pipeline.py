"""The build pipeline: labelled images -> frozen backbone features (streamed, sharded cache) -> trained head ->
build directory."""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..core.drift import EmbeddingReference
from ..core.errors import BadRequest, BuildError
from ..core.files import atomic_write_bytes, atomic_write_json
from ..core.manifest import BuildDir, HeadEntry, Manifest
from ..core.names import (
    BACKBONE_FP16,
    BACKBONE_INT8,
    BACKBONE_ONNX,
    BACKBONE_PT,
    CONFUSION_PNG,
    CURVES_PNG,
    EMBEDDING_REFERENCE,
    EMBEDDING_REFERENCE_KEY,
    FUSED_FP16,
    FUSED_ONNX,
    HEAD_ONNX,
    HEAD_PT,
    HEADS_DIR,
    HISTORY_JSON,
    PARITY_JSON,
    check_name,
)
from ..core.preprocess import Preprocessing
from ..core.runtime import gpu_count
from .architectures import HeadSpec, build_head
from .backbones import LoadedBackbone, get_spec, load_backbone, load_saved_backbone
from .config import FineTune, SelfTraining, TrainConfig
from .data import ImageFolderData, load_data
from .export import build_metadata, export_backbone, export_head, fuse, to_fp16
from .extract import Engine, OrtEngine, StreamEngine, TorchEngine, extraction_sessions, resolve_device, resolve_engine
from .features import FeatureCache, default_cache_dir
from .methods import Run, TrainingMethod, checked, entry_point, trainer
from .parity import BATCH_SIZES, FP16, ParityReport, Tolerance, run_parity
from .plots import plot_confusion, plot_curves
from .quantize import int8_parity

log = logging.getLogger(__name__)


def atomic_save_torch(path: str | Path, obj: object) -> None:
    """Atomically ``torch.save`` an object (state_dicts only: they load back with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class BuildOptions:
    """Everything `tl-models build` takes."""

    data: Path | None
    out: Path
    backbone: str = "mobilenet_v2"
    weights: str = "DEFAULT"
    kind: str = "linear"
    head: str = "default"
    hidden: int = 512
    dropout: float = 0.0
    fine_tune: FineTune = field(default_factory=FineTune)  # stages 0: the backbone stays frozen
    val_fraction: float = 0.2
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: Path | None = None
    progress: bool = True
    export: bool = True
    fused: bool = False
    tolerance: Tolerance = field(default_factory=Tolerance)
    unlabeled: Path | None = None  # self-training on these images' embeddings (training.semi)
    target: Path | None = None  # unlabelled target-domain images: align to them (training.adapt)
    self_training: SelfTraining = field(default_factory=SelfTraining)
    from_log: Path | None = None  # train from a service's embedding log instead (training.traffic)
    engine: str = "auto"  # feature extraction: auto, onnxruntime or torch (training.extract)
    device: str = "auto"  # auto, cpu or cuda: extraction and fine-tuning's stage 2
    ray: str | None = None  # a Ray cluster's HOST:PORT: extraction there (training.distributed)
    ray_actors: int = 2  # backbone sessions (actors) on the cluster


@dataclass
class BuildReport:
    """What a build produced: the head entry, whether the feature cache was hit, the manifest."""

    head: HeadEntry
    cache_hit: bool
    manifest: Manifest
    extraction: dict = field(default_factory=dict)  # Features.summary() of the labelled images (not in the manifest)


def _library_versions() -> dict:
    import torchvision

    return {
        "tl_models": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _new_manifest(options: BuildOptions, backbone: LoadedBackbone, labels: list[str]) -> Manifest:
    prep = backbone.preprocessing
    name = re.sub(r"[^a-z0-9_-]", "_", options.out.resolve().name.lower()).lstrip("_-")[:63]
    return Manifest(
        name=check_name(name, "build name (from the --out folder's name)"),
        backbone=backbone.spec.name,
        weights=backbone.weights_id,
        embedding_dim=backbone.spec.embedding_dim,
        input_size=[3, prep.crop_size, prep.crop_size],
        mean=list(prep.mean),
        std=list(prep.std),
        preprocessing=prep.to_dict(),
        labels=labels,
        top_files=[BACKBONE_PT],
        versions=_library_versions(),
    )


def _check_compatible(manifest: Manifest, options: BuildOptions, backbone: LoadedBackbone, labels: list[str]) -> None:
    if manifest.backbone != backbone.spec.name or manifest.weights != backbone.weights_id:
        raise BuildError(
            f"{options.out} holds heads for {manifest.backbone} with weights {manifest.weights}, "
            f"not {backbone.spec.name} with {backbone.weights_id}: heads share one backbone, "
            "use another --out"
        )
    if manifest.labels != labels:
        raise BuildError(
            f"{options.out} has labels {manifest.labels}, the data has {labels}: "
            "heads of one build share their labels, use another --out"
        )
    if options.fine_tune.stages:
        raise BuildError(
            f"--fine-tune changes the backbone, which the heads already in {options.out} share: use a new --out"
        )
    if any(fine_tuned(head) for head in manifest.heads):
        raise BuildError(
            f"{options.out} holds a fine-tuned backbone; a new head would train on features of the "
            f"original {backbone.weights_id} weights: use a new --out (or --weights {options.out} "
            "to start a new build from the fine-tuned backbone)"
        )


def fine_tuned(head: HeadEntry) -> bool:
    """Whether this head's build changed its backbone (``--fine-tune``; ``unfreeze_last`` in builds made before
    the recipe replaced that flag)."""
    return bool((head.train.get("fine_tune") or {}).get("kept") or head.train.get("unfreeze_last"))


def build(options: BuildOptions) -> BuildReport:
    """Train one head and commit it into the build directory (a new head, or a new version of one), with the
    training methods the options select (``training.methods``; one that replaces the whole build, such as
    ``--from-log``, gets it).

    A first build that fails leaves no folder behind (or, in a folder that existed, none of its own files)."""
    entry = entry_point(options)
    if entry is not None:
        return entry(options)
    check_name(options.head)
    if options.data is None:
        raise BadRequest("give the labelled images (--data DIR), or --from-log LOG to train from served traffic")
    options.fine_tune.check()
    resolve_engine(options.engine, resolve_device(options.device))  # an unusable device: refused before any work
    if options.ray is not None:
        from .distributed import connect

        if options.engine == "torch" or not options.export:
            raise BadRequest(
                "--ray extracts with ONNX Runtime on the build's backbone.onnx: it cannot be combined "
                "with --engine torch or --no-export"
            )
        connect(options.ray)
    data = load_data(options.data)
    methods = checked(options, data)
    backbone = load_backbone(options.backbone, options.weights, seed=options.train.seed)
    for method in methods:
        method.check_backbone(options, backbone)
    build_dir = BuildDir(options.out)
    created = not build_dir.path.exists()
    first = not build_dir.exists()
    try:
        with build_dir.lock(create=True):
            return _build_locked(options, build_dir, data, backbone, methods)
    except BaseException:
        if first and not build_dir.exists():
            _remove_partial(build_dir, created)
        raise


def _remove_partial(build_dir: BuildDir, created: bool) -> None:
    """Undo a failed first build: the folder it created, or the files it wrote into an existing one."""
    if created:
        shutil.rmtree(build_dir.path, ignore_errors=True)
        return
    for name in (BACKBONE_PT, BACKBONE_ONNX, BACKBONE_FP16, ".lock"):
        (build_dir.path / name).unlink(missing_ok=True)
    shutil.rmtree(build_dir.path / HEADS_DIR, ignore_errors=True)


def _build_locked(
    options: BuildOptions,
    build_dir: BuildDir,
    data: ImageFolderData,
    backbone: LoadedBackbone,
    methods: list[TrainingMethod],
) -> BuildReport:
    build_dir.clean_staging()
    manifest = build_dir.manifest() if build_dir.exists() else None
    first = manifest is None
    if manifest is None:
        manifest = _new_manifest(options, backbone, data.classes)
    else:
        _check_compatible(manifest, options, backbone, data.classes)
        build_dir.verify(manifest)
    spec = HeadSpec(options.kind, backbone.spec.embedding_dim, len(data.classes), options.hidden, options.dropout)
    train_idx, val_idx = data.split(options.val_fraction, options.train.seed)
    cache = FeatureCache(options.cache_dir or default_cache_dir())
    engine, exported = extraction_engine(options, build_dir, manifest, backbone)
    extraction = cache.features(backbone, data, engine, progress=options.progress)
    # a plain head reads its rows from the cache's shards as it trains (memory flat whatever N)
    run = Run(
        options,
        data,
        backbone,
        spec,
        train_idx,
        val_idx,
        torch.tensor(data.targets),
        extraction,
        extraction.embeddings,
        exported,
    )

    def embed(folder: ImageFolderData) -> np.ndarray:
        # F821: `del engine` below empties this closure's cell; embed is called only by prepare, before that
        return cache.features(backbone, folder, engine, progress=options.progress).array  # noqa: F821

    for method in methods:
        method.prepare(run, embed)
    del engine, embed  # its session is not needed past extraction
    if run.reference is None:
        run.reference = EmbeddingReference.of(extraction.embeddings, train_idx, val_idx)
    head_trainer = trainer(methods)
    if head_trainer is None:
        run.fit()
    else:
        head_trainer.train(run)
    if first:
        atomic_save_torch(build_dir.path / BACKBONE_PT, backbone.module.state_dict())

    def annotate(staged: Path, entry: HeadEntry) -> None:
        for method in methods:
            method.annotate(run, staged, entry)

    record = {
        "root": str(data.root),
        "content_hash": data.content_hash(),
        "images": len(data.paths),
        "train": len(train_idx),
        "val": len(val_idx),
        "val_fraction": options.val_fraction,
        "skipped": len(data.skipped),
        "split": "random" if data.splits is None else "listing",
    }
    assert run.head is not None  # set by run.fit() or the method that trains the head
    entry, manifest = commit_head(
        build_dir,
        manifest,
        options,
        run.spec,
        run.head,
        run.result,
        record,
        backbone.module,
        run.reference,
        extraction.hit,
        annotate,
        backbone_exported=run.exported,
    )
    return BuildReport(entry, extraction.hit, manifest, extraction.summary())


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


def commit_head(
    build_dir: BuildDir,
    manifest: Manifest,
    options: BuildOptions,
    spec: HeadSpec,
    head: torch.nn.Module,
    result,
    data_record: dict,
    backbone: torch.nn.Module,
    reference: EmbeddingReference | None,
    cache_hit: bool = False,
    annotate: Callable[[Path, HeadEntry], None] | None = None,
    backbone_exported: bool = False,
) -> tuple[HeadEntry, Manifest]:
    """Stage a trained head as the next version of ``options.head`` (files, curves, reference), export it and
    check parity (the backbone too when the build has no backbone.onnx yet: exported here unless
    ``backbone_exported`` says extraction already wrote the current one), then commit the manifest."""
    version = build_dir.next_version(options.head, manifest)
    staged = build_dir.staging_dir()
    try:
        entry = _stage_head(staged, options, spec, version, result, manifest.labels, data_record, cache_hit)
        if reference is not None:
            atomic_write_json(staged / EMBEDDING_REFERENCE, reference.to_dict())
        if annotate is not None:
            annotate(staged, entry)
        entry.files = sorted(p.name for p in staged.iterdir())
        if options.export:
            new_backbone = BACKBONE_ONNX not in manifest.top_files
            report = export_and_check(
                build_dir,
                manifest,
                backbone,
                [(entry, head, staged)],
                new_backbone,
                options.tolerance,
                fused=options.fused,
                exported=backbone_exported,
            )
            if new_backbone:
                manifest.top_files.append(BACKBONE_ONNX)
            entry.files = sorted(p.name for p in staged.iterdir())
            entry.parity = {"passed": report.passed, "max_abs_diff": max(c.max_abs_diff for c in report.checks)}
        manifest.heads.append(entry)
        manifest = build_dir.commit(manifest, staged, entry.path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    log.info("head %s v%d: val accuracy %.4f", options.head, version, result.metrics["val_accuracy"])
    return entry, manifest


def _stage_head(
    staged: Path,
    options: BuildOptions,
    spec: HeadSpec,
    version: int,
    result,
    classes: list[str],
    data_record: dict,
    cache_hit: bool,
) -> HeadEntry:
    atomic_save_torch(staged / HEAD_PT, result.head_state)
    (staged / HISTORY_JSON).write_text(json.dumps(result.history, indent=1))
    plot_curves(result.history, staged / CURVES_PNG)
    plot_confusion(result.metrics["confusion_matrix"], classes, staged / CONFUSION_PNG)
    return HeadEntry(
        name=options.head,
        version=version,
        kind=spec.kind,
        spec=spec.to_dict(),
        path=f"{HEADS_DIR}/{options.head}/{version}",
        files=sorted(p.name for p in staged.iterdir()),
        metrics=result.metrics,
        train={**options.train.__dict__, "fine_tune": None, "feature_cache_hit": cache_hit},
        data=data_record,
    )


HeadWork = tuple[HeadEntry, torch.nn.Module, Path]  # an entry, its torch module, the folder its files go to


def export_and_check(
    build_dir: BuildDir,
    manifest: Manifest,
    backbone: torch.nn.Module,
    heads: list[HeadWork],
    with_backbone: bool,
    tolerance: Tolerance,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    fused: bool = False,
    exported: bool = False,
) -> ParityReport:
    """Export backbone.onnx (if ``with_backbone``, unless ``exported``: it is there and current) and each head's
    head.onnx into its folder, then run parity on what was exported and on the fused graph (backbone + head,
    composed in memory; written as fused.onnx when ``fused``). ParityError past tolerance. Each head folder gets
    its parity.json."""
    backbone_path = build_dir.path / BACKBONE_ONNX
    if with_backbone and not exported:
        export_backbone(
            backbone,
            manifest.input_size,
            backbone_path,
            build_metadata(manifest),
            get_spec(manifest.backbone).onnx_exporter,
        )
    graphs = {}
    for entry, head, folder in heads:
        meta = build_metadata(manifest, entry)
        export_head(head, manifest.embedding_dim, folder / HEAD_ONNX, {**meta, **_reference_metadata(folder)})
        fused_graph = fuse(backbone_path, folder / HEAD_ONNX, meta, folder / FUSED_ONNX if fused else None)
        graphs[entry.key] = (head, str(folder / HEAD_ONNX), fused_graph)
    report = run_parity(
        backbone, manifest.input_size, str(backbone_path) if with_backbone else None, graphs, tolerance, batch_sizes
    )
    for entry, _, folder in heads:
        own = [c for c in report.checks if c.graph == "backbone" or c.graph.startswith(entry.key + "/")]
        atomic_write_json(folder / PARITY_JSON, ParityReport(tolerance, own, report.providers).to_dict())
    log.info("parity (PyTorch vs ONNX Runtime):\n%s", report.table())
    report.raise_on_failure()
    return report


def _reference_metadata(folder: Path) -> dict:
    """A head's embedding reference for its head.onnx metadata (so it travels with the graph), if it has one."""
    path = folder / EMBEDDING_REFERENCE
    return {EMBEDDING_REFERENCE_KEY: json.loads(path.read_text())} if path.is_file() else {}


def reexport(
    path: str | Path, tolerance: Tolerance = Tolerance(), fp16: bool = False, fused: bool = False
) -> ParityReport:
    """`tl-models export`: export every graph of a build again (fused.onnx per head version when ``fused`` or
    already there; fp16 copies when ``fp16``); files are swapped in only after parity passes."""
    build_dir = BuildDir(path)
    with build_dir.lock():
        manifest = build_dir.verify()
        backbone = load_build_backbone(build_dir, manifest)
        scratch = build_dir.staging_dir()
        try:
            folders = {e.path: scratch / e.path for e in manifest.heads}
            for entry in manifest.heads:
                folders[entry.path].mkdir(parents=True)
                if EMBEDDING_REFERENCE in entry.files:  # the export puts it into head.onnx again
                    shutil.copy(build_dir.file(entry.rel(EMBEDDING_REFERENCE)), folders[entry.path])
            heads = [(e, load_head_module(build_dir, e), folders[e.path]) for e in manifest.heads]
            fused = fused or any(FUSED_ONNX in e.files for e in manifest.heads)
            report = export_and_check(BuildDir(scratch), manifest, backbone.module, heads, True, tolerance, fused=fused)
            top = [BACKBONE_ONNX] + ([BACKBONE_FP16] if fp16 else [])
            if fp16:
                export_fp16(scratch, manifest, backbone.module, heads, fused)
            rewritten = list(top)
            for entry, _, folder in heads:
                rewritten += [entry.rel(file.name) for file in folder.iterdir()]
                entry.files = sorted(set(entry.files) | {f.name for f in folder.iterdir()})
            for rel in rewritten:
                os.replace(scratch / rel, build_dir.path / rel)
            manifest.top_files += [name for name in top if name not in manifest.top_files]
            build_dir.commit(manifest, rewritten=tuple(rewritten))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def export_fp16(
    root: Path, manifest: Manifest, backbone: torch.nn.Module, heads: list[HeadWork], fused: bool = False
) -> ParityReport | None:
    """backbone.fp16.onnx from the fp32 graph under ``root`` (and fused.fp16.onnx per head when ``fused``); the
    fused fp16 graphs' parity (within 1% of the largest output, top-1 agreement >= 99%) is checked where a GPU runs
    them, else skipped."""
    to_fp16(root / BACKBONE_ONNX, root / BACKBONE_FP16, {})
    graphs = {}
    for entry, head, folder in heads:
        fused_graph = fuse(
            root / BACKBONE_FP16,
            folder / HEAD_ONNX,
            build_metadata(manifest, entry),
            folder / FUSED_FP16 if fused else None,
        )
        graphs[entry.key] = (head, str(folder / HEAD_ONNX), fused_graph)
    if gpu_count() == 0:
        log.warning("fp16 parity skipped: no GPU here, and fp16 is for GPU serving (CPU kernels are slow or missing)")
        return None
    report = run_parity(backbone, manifest.input_size, str(root / BACKBONE_FP16), graphs, Tolerance(**FP16))
    log.info("fp16 parity (PyTorch fp32 vs ONNX Runtime fp16):\n%s", report.table())
    report.raise_on_failure()
    return report


def check_parity(
    path: str | Path, tolerance: Tolerance = Tolerance(), batch_sizes: tuple[int, ...] = BATCH_SIZES
) -> ParityReport:
    """`tl-models parity`: compare a build's ONNX files (and each fused backbone + head graph) against its PyTorch
    modules, and an int8 backbone against fp32 ONNX Runtime with its gate's measures; writes parity.json (under the
    build's lock: it reads the build as one writer left it)."""
    build_dir = BuildDir(path)
    with build_dir.lock():
        return _check_parity(build_dir, tolerance, batch_sizes)


def _check_parity(build_dir: BuildDir, tolerance: Tolerance, batch_sizes: tuple[int, ...]) -> ParityReport:
    manifest = build_dir.verify()
    if BACKBONE_ONNX not in manifest.top_files:
        raise BuildError(f"{build_dir.path} has no ONNX export; run `tl-models export {build_dir.path}`")
    backbone = load_build_backbone(build_dir, manifest)
    graphs = {}
    for entry in manifest.heads:
        head_path = build_dir.file(entry.rel(HEAD_ONNX))
        graphs[entry.key] = (
            load_head_module(build_dir, entry),
            str(head_path),
            fuse(build_dir.file(BACKBONE_ONNX), head_path, build_metadata(manifest, entry)),
        )
    report = run_parity(
        backbone.module, manifest.input_size, str(build_dir.file(BACKBONE_ONNX)), graphs, tolerance, batch_sizes
    )
    if BACKBONE_INT8 in manifest.files:
        report.int8 = int8_parity(build_dir, manifest)
    atomic_write_json(build_dir.file(PARITY_JSON), report.to_dict())
    return report


def load_head_module(build_dir: BuildDir, entry: HeadEntry) -> torch.nn.Module:
    """Rebuild a committed head from its spec and state_dict (weights_only load)."""
    head = build_head(HeadSpec.from_dict(entry.spec))
    head.load_state_dict(torch.load(build_dir.file(entry.rel(HEAD_PT)), map_location="cpu", weights_only=True))
    return head.eval()


def load_build_backbone(build_dir: BuildDir, manifest: Manifest) -> LoadedBackbone:
    """The build's backbone with its saved state_dict (no download: the build is self-contained)."""
    return load_saved_backbone(
        manifest.backbone,
        build_dir.file(BACKBONE_PT),
        manifest.weights,
        Preprocessing.from_dict(manifest.preprocessing),
    )


def summary_line(report: BuildReport) -> str:
    """One line for the terminal."""
    head = report.head
    tuned = head.train.get("fine_tune")
    stage2 = (
        ""
        if not tuned
        else (
            f"; fine-tuned {tuned['stages']} stage(s): val {tuned['stage1_val_accuracy']:.4f} -> "
            f"{tuned['stage2_val_accuracy']:.4f}" + ("" if tuned["kept"] else ", no better: backbone left frozen")
        )
    )
    return (
        f"{head.name} v{head.version} ({head.kind}) on {report.manifest.backbone} "
        f"[{report.manifest.weights}]: val accuracy {head.metrics['val_accuracy']:.4f} "
        f"(feature cache {_cache_word(report)}{stage2})"
    )


def _cache_word(report: BuildReport) -> str:
    if "log" in report.head.data and "images" not in report.head.data:
        return "not used: logged embeddings"
    if report.cache_hit:
        return "hit"
    run = report.extraction
    if run.get("shards_cached"):
        return (
            f"resumed: {run['shards_cached']} of {run['shards']} shards cached, {run['embedded']} of "
            f"{run['images']} images embedded by {run['engine']} on {run['device']}, {run['where']}"
        )
    if not run:
        return "miss"
    return f"miss: {run['images']} images embedded by {run['engine']} on {run['device']}, {run['where']}"
