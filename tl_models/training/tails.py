"""Fine-tuned versions in a shared build: a head version whose backbone's last N stages are its own (its *tail*),
on the build's frozen trunk (``training.cut``).

``tl-models build --out EXISTING --head NAME --fine-tune N`` tunes the build's own ``backbone.pt`` and keeps only
the tuned stages: the trunk stays bit-identical (checked), ``backbone.pt`` and the frozen heads' files do not
change. Per cut the build gains two top-level graphs, shared by every version with that cut: ``trunk-N.onnx``
(image -> activation) and ``tail-N.onnx`` (the frozen backbone's own last N stages). Each tuned version adds
``tail.pt`` and ``tail.onnx`` (activation -> embedding) beside its ``head.onnx``; its manifest entry's ``tail``
records the cut. Parity: trunk then frozen tail equals ``backbone.onnx``; each tuned version's ONNX path (trunk,
its tail, its head) equals its PyTorch modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import BuildError
from ..core.manifest import BuildDir, HeadEntry, Manifest
from ..core.names import BACKBONE_ONNX, EMBEDDING, HEAD_ONNX, IMAGE, TAIL_ONNX, TAIL_PT, frozen_tail_onnx, trunk_onnx
from ..core.runtime import create_session
from .backbones import LoadedBackbone, get_spec
from .build_backbone import load_build_backbone
from .cut import Cut, cut_backbone, tail_state
from .export import atomic_save_torch, build_metadata, chain, export_tail, export_trunk
from .parity import OutputCheck, ParityReport, Tolerance, compare, parity_inputs, run_parity


def shared_graphs(stages: int) -> list[str]:
    """The build's graphs every tuned version with a cut of ``stages`` runs: its trunk and the frozen tail."""
    return [trunk_onnx(stages), frozen_tail_onnx(stages)]


def tail_record(cut: Cut) -> dict:
    """A tuned version's ``tail`` in the manifest: the cut, and the shared graphs its path runs."""
    trunk, frozen_tail = shared_graphs(cut.stages)
    return {**cut.record(), "trunk": trunk, "frozen_tail": frozen_tail}


def check_trunk_unchanged(frozen: LoadedBackbone, tuned: Cut) -> None:
    """BuildError unless every weight of the tuned backbone outside its tail equals the frozen backbone's: a tuned
    version must run on the build's trunk as it is."""
    tail = set(tuned.tail.state_dict())
    tuned_state = dict(tuned.trunk.state_dict())
    for key, value in frozen.module.state_dict().items():
        if key in tail or key not in tuned_state:
            continue
        if not torch.equal(value, tuned_state[key]):
            raise BuildError(f"fine-tuning changed {key}, which lies in the shared trunk before {tuned.at}")


def save_tail(cut: Cut, folder: Path) -> None:
    """The tuned version's ``tail.pt`` (its tail's parameters and buffers only)."""
    atomic_save_torch(folder / TAIL_PT, tail_state(cut))


def tuned_backbone(build_dir: BuildDir, manifest: Manifest, entry: HeadEntry) -> Cut:
    """A tuned version's path as PyTorch modules: the build's backbone.pt cut as its ``tail`` records, with the
    version's ``tail.pt`` loaded into the tail."""
    assert entry.tail is not None  # only tuned versions have a tail
    cut = cut_backbone(load_build_backbone(build_dir, manifest), entry.tail["stages"])
    cut.tail.load_state_dict(torch.load(build_dir.file(entry.rel(TAIL_PT)), map_location="cpu", weights_only=True))
    return cut


def export_trunk_files(root: Path, manifest: Manifest, frozen: LoadedBackbone, stages: int) -> None:
    """``trunk-N.onnx`` and ``tail-N.onnx`` of the frozen backbone under ``root``, unless both are there and in the
    manifest already."""
    names = shared_graphs(stages)
    if all(name in manifest.top_files and (root / name).is_file() for name in names):
        return
    cut = cut_backbone(frozen, stages)
    exporter = get_spec(manifest.backbone).onnx_exporter
    meta = {**build_metadata(manifest), "cut": cut.record()}
    export_trunk(cut.trunk, manifest.input_size, root / names[0], meta, exporter)
    export_tail(cut.tail, cut.activation, root / names[1], meta, exporter)


def trunk_parity(
    root: Path, stages: int, input_size: list[int], tolerance: Tolerance, batch_sizes: tuple[int, ...]
) -> list[OutputCheck]:
    """``trunk-N.onnx`` then ``tail-N.onnx`` against ``backbone.onnx`` under ``root``, ONNX Runtime on both sides: the
    frozen heads' answers must not depend on whether a server runs the trunk."""
    trunk, frozen_tail = shared_graphs(stages)
    composed = chain([root / trunk, root / frozen_tail], {"graph": "trunk+tail"})
    largest = parity_inputs(max(batch_sizes), input_size)
    reference = create_session(str(root / BACKBONE_ONNX)).run([EMBEDDING], {IMAGE: largest})[0]
    got = create_session(composed).run([EMBEDDING], {IMAGE: largest})[0]
    return [
        compare(f"{trunk}+{frozen_tail}", EMBEDDING, reference[:batch], got[:batch], tolerance, False)
        for batch in batch_sizes
    ]


def export_tuned_tail(manifest: Manifest, entry: HeadEntry, cut: Cut, folder: Path) -> None:
    """A tuned version's ``tail.onnx`` into ``folder``."""
    meta = {**build_metadata(manifest, entry), "cut": cut.record()}
    export_tail(cut.tail, cut.activation, folder / TAIL_ONNX, meta, get_spec(manifest.backbone).onnx_exporter)


def tuned_parity(
    root: Path,
    entry: HeadEntry,
    cut: Cut,
    head: torch.nn.Module,
    folder: Path,
    input_size: list[int],
    tolerance: Tolerance,
    batch_sizes: tuple[int, ...],
    images: np.ndarray | None = None,
) -> ParityReport:
    """A tuned version's ONNX path against its PyTorch modules: trunk then tail (the embedding) and trunk, tail,
    head (the logits); ``folder`` holds its ``tail.onnx`` and ``head.onnx``, ``root`` the build's trunk."""
    assert entry.tail is not None  # only tuned versions have a tail
    trunk = root / entry.tail["trunk"]
    embedding = chain([trunk, folder / TAIL_ONNX], {"graph": "trunk+tail"})
    fused = chain([trunk, folder / TAIL_ONNX, folder / HEAD_ONNX], {"graph": "fused"})
    tuned = torch.nn.Sequential(cut.trunk, cut.tail).eval()
    report = run_parity(
        tuned,
        input_size,
        embedding,
        {entry.key: (head, str(folder / HEAD_ONNX), fused)},
        tolerance,
        batch_sizes,
        images=images,
    )
    for check in report.checks:
        if check.graph == "backbone":
            check.graph = f"{entry.key}/trunk+tail"
    return report
