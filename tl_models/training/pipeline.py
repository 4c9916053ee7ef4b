"""The build pipeline: labelled images -> frozen backbone features (streamed, sharded cache) -> trained head ->
build directory."""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..core.drift import EmbeddingReference
from ..core.errors import BadRequest, BuildError
from ..core.files import atomic_write_json
from ..core.manifest import BuildDir, HeadEntry, Manifest
from ..core.names import (
    BACKBONE_FP16,
    BACKBONE_INT8,
    BACKBONE_ONNX,
    BACKBONE_PT,
    EMBEDDING_REFERENCE,
    FUSED_FP16,
    FUSED_ONNX,
    HEAD_ONNX,
    HEAD_PT,
    HEADS_DIR,
    PARITY_JSON,
    check_name,
)
from ..core.runtime import gpu_count
from .architectures import HeadSpec, build_head
from .backbones import LoadedBackbone, load_backbone
from .build_backbone import extraction_engine, load_build_backbone
from .commit import HeadWork, commit_head, export_and_check
from .data import ImageFolderData, load_data
from .export import atomic_save_torch, build_metadata, fuse, to_fp16
from .extract import resolve_device, resolve_engine
from .features import FeatureCache, default_cache_dir
from .methods import Run, TrainingMethod, checked, entry_point, trainer
from .options import BuildOptions, BuildReport
from .parity import BATCH_SIZES, FP16, ParityReport, Tolerance, run_parity
from .quantize import int8_parity
from .tails import shared_graphs, trunk_parity, tuned_backbone, tuned_parity

log = logging.getLogger(__name__)


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
    if options.fine_tune.stages and not (options.export and BACKBONE_ONNX in manifest.top_files):
        raise BuildError(
            f"--fine-tune into {options.out} adds a version with a tail of its own on the build's trunk, exported "
            f"beside backbone.onnx: export the build first (`tl-models export {options.out}`) and drop --no-export"
        )
    if any(fine_tuned(head) for head in manifest.heads):
        raise BuildError(
            f"{options.out} holds a fine-tuned backbone; a new head would train on features of the "
            f"original {backbone.weights_id} weights: use a new --out (or --weights {options.out} "
            "to start a new build from the fine-tuned backbone)"
        )


def fine_tuned(head: HeadEntry) -> bool:
    """Whether this head's build changed its backbone (``--fine-tune`` in a build of its own; ``unfreeze_last`` in
    builds made before the recipe replaced that flag). A version with a tail of its own (``training.tails``) left
    the build's backbone as it was."""
    if head.tail is not None:
        return False
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
        if options.fine_tune.stages:  # a tail of its own on the build's trunk: tuned from backbone.pt, bit for bit
            backbone = load_build_backbone(build_dir, manifest)
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
        shared_trunk=not first,
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
        tail=run.tail,
    )
    return BuildReport(entry, extraction.hit, manifest, extraction.summary())


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
            tuned = {e.key: tuned_backbone(build_dir, manifest, e) for e in manifest.heads if e.tail is not None}
            fused = fused or any(FUSED_ONNX in e.files for e in manifest.heads)
            report = export_and_check(
                BuildDir(scratch),
                manifest,
                backbone.module,
                heads,
                True,
                tolerance,
                fused=fused,
                tuned=tuned,
                frozen=backbone,
            )
            top = [BACKBONE_ONNX] + ([BACKBONE_FP16] if fp16 else [])
            top += [name for stages in sorted({c.stages for c in tuned.values()}) for name in shared_graphs(stages)]
            if fp16:  # a tuned version's path runs its own tail: no fp16 copy of it yet
                plain = [work for work in heads if work[0].key not in tuned]
                export_fp16(scratch, manifest, backbone.module, plain, fused)
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
        if entry.tail is not None:  # checked on its own path below
            continue
        head_path = build_dir.file(entry.rel(HEAD_ONNX))
        graphs[entry.key] = (
            load_head_module(build_dir, entry),
            str(head_path),
            fuse(build_dir.file(BACKBONE_ONNX), head_path, build_metadata(manifest, entry)),
        )
    report = run_parity(
        backbone.module, manifest.input_size, str(build_dir.file(BACKBONE_ONNX)), graphs, tolerance, batch_sizes
    )
    tuned = [entry for entry in manifest.heads if entry.tail is not None]
    for stages in sorted({entry.tail["stages"] for entry in tuned if entry.tail is not None}):
        report.checks += trunk_parity(build_dir.path, stages, manifest.input_size, tolerance, batch_sizes)
    for entry in tuned:
        path = tuned_parity(
            build_dir.path,
            entry,
            tuned_backbone(build_dir, manifest, entry),
            load_head_module(build_dir, entry),
            build_dir.file(entry.path),
            manifest.input_size,
            tolerance,
            batch_sizes,
        )
        report.checks += path.checks
    if BACKBONE_INT8 in manifest.files:
        report.int8 = int8_parity(build_dir, manifest)
    atomic_write_json(build_dir.file(PARITY_JSON), report.to_dict())
    return report


def load_head_module(build_dir: BuildDir, entry: HeadEntry) -> torch.nn.Module:
    """Rebuild a committed head from its spec and state_dict (weights_only load)."""
    head = build_head(HeadSpec.from_dict(entry.spec))
    head.load_state_dict(torch.load(build_dir.file(entry.rel(HEAD_PT)), map_location="cpu", weights_only=True))
    return head.eval()
