"""Committing one head version into a build directory: its files staged, its graphs exported and checked for
parity, the manifest committed last. The one primitive every way of training a head ends with (the pipeline,
`build --from-log`)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..core.drift import EmbeddingReference
from ..core.files import atomic_write_json
from ..core.manifest import BuildDir, HeadEntry, Manifest
from ..core.names import (
    BACKBONE_ONNX,
    CONFUSION_PNG,
    CURVES_PNG,
    EMBEDDING_REFERENCE,
    EMBEDDING_REFERENCE_KEY,
    FUSED_ONNX,
    HEAD_ONNX,
    HEAD_PT,
    HEADS_DIR,
    HISTORY_JSON,
    PARITY_JSON,
)
from .architectures import HeadSpec
from .backbones import LoadedBackbone, get_spec
from .build_backbone import load_build_backbone
from .cut import Cut
from .export import atomic_save_torch, build_metadata, export_backbone, export_head, fuse
from .options import BuildOptions
from .parity import BATCH_SIZES, ParityReport, Tolerance, run_parity
from .plots import plot_confusion, plot_curves
from .tails import (
    check_trunk_unchanged,
    export_trunk_files,
    export_tuned_tail,
    save_tail,
    shared_graphs,
    tail_record,
    trunk_parity,
    tuned_parity,
)

log = logging.getLogger(__name__)


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
    tail: Cut | None = None,
) -> tuple[HeadEntry, Manifest]:
    """Stage a trained head as the next version of ``options.head`` (files, curves, reference), export it and
    check parity (the backbone too when the build has no backbone.onnx yet: exported here unless
    ``backbone_exported`` says extraction already wrote the current one), then commit the manifest.

    With ``tail`` (a fine-tuned version on the build's trunk, ``training.tails``): ``backbone`` is the tuned
    module, whose trunk must equal the build's; the version keeps its tail, the build gains the cut's shared
    graphs."""
    version = build_dir.next_version(options.head, manifest)
    staged = build_dir.staging_dir()
    frozen = None
    try:
        entry = _stage_head(staged, options, spec, version, result, manifest.labels, data_record, cache_hit)
        if reference is not None:
            atomic_write_json(staged / EMBEDDING_REFERENCE, reference.to_dict())
        if tail is not None:
            frozen = load_build_backbone(build_dir, manifest)
            check_trunk_unchanged(frozen, tail)
            entry.tail = tail_record(tail)
            save_tail(tail, staged)
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
                tuned={entry.key: tail} if tail is not None else None,
                frozen=frozen,
            )
            if new_backbone:
                manifest.top_files.append(BACKBONE_ONNX)
            if tail is not None:
                manifest.top_files += [name for name in shared_graphs(tail.stages) if name not in manifest.top_files]
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
    tuned: Mapping[str, Cut] | None = None,
    frozen: LoadedBackbone | None = None,
) -> ParityReport:
    """Export backbone.onnx (if ``with_backbone``, unless ``exported``: it is there and current) and each head's
    head.onnx into its folder, then run parity on what was exported and on the fused graph (backbone + head,
    composed in memory; written as fused.onnx when ``fused``). ParityError past tolerance. Each head folder gets
    its parity.json.

    Fine-tuned versions (``tuned``: key -> the cut of its tuned backbone) get their tail.onnx instead of a fused
    graph, and the build the cut's shared trunk-N.onnx and tail-N.onnx (from the ``frozen`` backbone) unless it has
    them: parity of trunk then frozen tail against backbone.onnx, and of the version's ONNX path against PyTorch."""
    backbone_path = build_dir.path / BACKBONE_ONNX
    if with_backbone and not exported:
        export_backbone(
            backbone,
            manifest.input_size,
            backbone_path,
            build_metadata(manifest),
            get_spec(manifest.backbone).onnx_exporter,
        )
    tuned = tuned or {}
    graphs = {}
    for entry, head, folder in heads:
        meta = build_metadata(manifest, entry)
        export_head(head, manifest.embedding_dim, folder / HEAD_ONNX, {**meta, **_reference_metadata(folder)})
        if entry.key not in tuned:
            fused_graph = fuse(backbone_path, folder / HEAD_ONNX, meta, folder / FUSED_ONNX if fused else None)
            graphs[entry.key] = (head, str(folder / HEAD_ONNX), fused_graph)
    report = ParityReport(tolerance)
    if graphs or with_backbone:
        report = run_parity(
            backbone, manifest.input_size, str(backbone_path) if with_backbone else None, graphs, tolerance, batch_sizes
        )
    for stages in sorted({cut.stages for cut in tuned.values()}):
        assert frozen is not None  # the caller gives the frozen backbone with tuned versions
        export_trunk_files(build_dir.path, manifest, frozen, stages)
        report.checks += trunk_parity(build_dir.path, stages, manifest.input_size, tolerance, batch_sizes)
    for entry, head, folder in heads:
        if entry.key in tuned:
            export_tuned_tail(manifest, entry, tuned[entry.key], folder)
            path = tuned_parity(
                build_dir.path, entry, tuned[entry.key], head, folder, manifest.input_size, tolerance, batch_sizes
            )
            report.checks += path.checks
            report.providers.update(path.providers)
    for entry, _, folder in heads:
        shared = tuple(shared_graphs(entry.tail["stages"])) if entry.tail else ("backbone",)
        own = [c for c in report.checks if c.graph.startswith(shared) or c.graph.startswith(entry.key + "/")]
        atomic_write_json(folder / PARITY_JSON, ParityReport(tolerance, own, report.providers).to_dict())
    log.info("parity (PyTorch vs ONNX Runtime):\n%s", report.table())
    report.raise_on_failure()
    return report


def _reference_metadata(folder: Path) -> dict:
    """A head's embedding reference for its head.onnx metadata (so it travels with the graph), if it has one."""
    path = folder / EMBEDDING_REFERENCE
    return {EMBEDDING_REFERENCE_KEY: json.loads(path.read_text())} if path.is_file() else {}
