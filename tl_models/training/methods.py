"""The training methods' registry: which methods a build's options select, and the steps of the build each one
takes over. A method's code lives in its own module (`semi`, `adapt`, `finetune`, `traffic`); its entry here is the
glue, so that a new method is one module and one entry, and `training.pipeline` has no branch of its own for it.

`build` (`training.pipeline`) runs these steps, each method's hook in registry order (the order of registration):

1. ``check``, before the backbone loads: refuse options that cannot work, read the method's own image folders;
   ``check_backbone`` once the backbone is loaded.
2. ``prepare``, once the labelled images are embedded and while the extraction engine is at hand: embed the
   method's folders, change what the head trains on (``Run.inputs``, its spec and first layer) and the drift
   reference.
3. ``train``: the head's training. The plain fit (``Run.fit``) unless one selected method ``trains_head``; two
   such methods in one build is a registry bug, refused before anything runs.
4. ``annotate``: what the method did, in the staged head version's entry and files.

Composition follows: CORAL (``prepare``) aligns the labelled embeddings before self-training (``train``) trains on
them; fine-tuning refuses both in its ``check``. A method that does not train on the build's images at all
(``from-log``) gives an ``entry`` instead: `build` hands the whole build to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, cast

import numpy as np
import torch

from ..core.drift import EmbeddingReference
from ..core.errors import BadRequest
from ..core.manifest import HeadEntry
from ..core.names import PSEUDO_LABELS_JSON
from .adapt import CORAL_EPS, coral
from .architectures import HeadSpec, Standardise, build_head
from .backbones import LoadedBackbone, stage_paths
from .cut import Cut, cut_backbone
from .data import ImageFolderData, load_unlabeled_folder
from .extract import resolve_device
from .features import CachedEmbeddings, Features
from .finetune import FineTuned, fine_tune
from .options import BuildOptions, BuildReport
from .semi import SelfTrainResult, self_train
from .traffic import build_from_log
from .train import Rows, TrainResult, fit

Embed = Callable[[ImageFolderData], np.ndarray]  # a folder -> its embeddings (the build's engine and cache)


@dataclass
class Run:
    """One build as its methods see it: set up by the pipeline, changed by the methods' steps."""

    options: BuildOptions
    data: ImageFolderData
    backbone: LoadedBackbone
    spec: HeadSpec
    train_idx: np.ndarray | list[int]
    val_idx: np.ndarray | list[int]
    targets: torch.Tensor
    extraction: Features
    inputs: torch.Tensor | CachedEmbeddings  # the rows the head trains on (the cache's shards by default)
    exported: bool  # backbone.onnx exported by extraction and still current
    shared_trunk: bool = False  # the build has heads already: a fine-tuned version keeps a tail of its own
    reference: EmbeddingReference | None = None  # None after ``prepare``: the labelled training split's
    statistics: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, std of a ``spec.standardise`` head
    head: torch.nn.Module | None = None
    result: TrainResult | None = None
    tail: Cut | None = None  # a fine-tuned version's own last stages, on the build's trunk (training.tails)

    def make_head(self) -> torch.nn.Module:
        """A fresh head of ``spec``, seeded, with ``statistics`` in its standardisation layer."""
        torch.manual_seed(self.options.train.seed)
        head = build_head(self.spec)
        if self.statistics is not None:
            cast(Standardise, head[0]).set_statistics(*self.statistics)
        return head

    def fit(self) -> None:
        """The plain training: a fresh head fitted on ``inputs``' training split, early-stopped on validation."""
        self.head = self.make_head()
        self.result = fit(
            self.head,
            Rows(self.inputs, self.train_idx),
            self.targets[self.train_idx],
            Rows(self.inputs, self.val_idx),
            self.targets[self.val_idx],
            self.options.train,
            progress=self.options.progress,
        )


class TrainingMethod:
    """A registered method. The registry holds the classes; each build makes one instance per selected method
    (its state lives there between steps). Every hook does nothing unless the method overrides it."""

    name: ClassVar[str]
    trains_head: ClassVar[bool] = False  # True: ``train`` replaces the plain fit
    entry: ClassVar[staticmethod[[BuildOptions], BuildReport] | None] = None  # the whole build instead, if given

    @staticmethod
    def wanted(options: BuildOptions) -> bool:
        """Whether the build's options select this method."""
        raise NotImplementedError

    def check(self, options: BuildOptions, data: ImageFolderData, folders: list[ImageFolderData]) -> None:
        """Before the backbone loads: refuse options that cannot work; read folders, appending them to
        ``folders`` (the methods' folders so far: one path given to two methods is read once)."""

    def check_backbone(self, options: BuildOptions, backbone: LoadedBackbone) -> None:
        """Once the backbone is loaded, before any work: refuse what it cannot do."""

    def prepare(self, run: Run, embed: Embed) -> None:
        """Embed this method's folders; change ``run``'s inputs, spec, statistics or reference."""

    def train(self, run: Run) -> None:
        """Set ``run.head`` and ``run.result`` (only called when ``trains_head``)."""
        raise NotImplementedError

    def annotate(self, run: Run, staged: Path, entry: HeadEntry) -> None:
        """Record what the method did in the staged head version (``entry`` and files under ``staged``)."""


METHODS: dict[str, type[TrainingMethod]] = {}


def register_method(method: type[TrainingMethod]) -> type[TrainingMethod]:
    """Class decorator: add a method to the registry under its ``name`` (after the ones registered before)."""
    if method.name in METHODS:
        raise ValueError(f"training method {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def selected(options: BuildOptions) -> list[TrainingMethod]:
    """A fresh instance of every registered method the options select, in registry order."""
    return [method() for method in METHODS.values() if method.wanted(options)]


def entry_point(options: BuildOptions) -> Callable[[BuildOptions], BuildReport] | None:
    """The entry of the first selected method that replaces the whole build, if any."""
    return next((method.entry for method in selected(options) if method.entry is not None), None)


def checked(options: BuildOptions, data: ImageFolderData) -> list[TrainingMethod]:
    """The selected methods, each of them checked and its folders read (``check``, in registry order)."""
    methods = selected(options)
    folders: list[ImageFolderData] = []
    for method in methods:
        method.check(options, data, folders)
    trainer(methods)  # two methods that train the head: refused before any work
    return methods


def trainer(methods: list[TrainingMethod]) -> TrainingMethod | None:
    """The one method among ``methods`` that trains the head itself; None: the plain fit."""
    trainers = [method for method in methods if method.trains_head]
    if len(trainers) > 1:
        raise RuntimeError(
            f"training methods {[m.name for m in trainers]} both train the head: one of them must "
            "refuse the other in its check"
        )
    return trainers[0] if trainers else None


def _read_once(folders: list[ImageFolderData], path: Path, data: ImageFolderData, *what: str) -> ImageFolderData:
    """The unlabelled folder at ``path``: one of ``folders`` when read already, else read and appended."""
    folder = next((f for f in folders if Path(path).resolve() == f.root.resolve()), None)
    if folder is None:
        folder = load_unlabeled_folder(path, data, *what)
        folders.append(folder)
    return folder


def folder_record(folder: ImageFolderData) -> dict:
    """An unlabelled folder as the manifest names it: where, content hash, image counts."""
    return {
        "root": str(folder.root),
        "content_hash": folder.content_hash(),
        "images": len(folder.paths),
        "skipped": len(folder.skipped),
    }


@register_method
class FineTuneMethod(TrainingMethod):
    """`--fine-tune N` (`training.finetune`): the plain fit, then stage 2 on the backbone's last N stages."""

    name = "fine-tune"
    trains_head = True
    tuned: FineTuned

    @staticmethod
    def wanted(options: BuildOptions) -> bool:
        return bool(options.fine_tune.stages)

    def check(self, options: BuildOptions, data: ImageFolderData, folders: list[ImageFolderData]) -> None:
        if options.unlabeled or options.target:
            raise BadRequest(
                "--unlabeled and --target work on cached embeddings: they cannot be combined with --fine-tune"
            )

    def check_backbone(self, options: BuildOptions, backbone: LoadedBackbone) -> None:
        stage_paths(backbone.spec, options.fine_tune.stages)  # a backbone with fewer stages: refused here

    def train(self, run: Run) -> None:
        run.fit()
        assert run.head is not None and run.result is not None  # set by run.fit()
        options = run.options
        self.tuned = fine_tune(
            run.backbone,
            run.head,
            run.data,
            run.train_idx,
            run.val_idx,
            run.result,
            run.extraction.array,
            options.train,
            options.fine_tune,
            options.progress,
            resolve_device(options.device),
        )
        run.result = self.tuned.result
        run.reference = EmbeddingReference.of(self.tuned.embeddings, run.train_idx, run.val_idx)
        if not self.tuned.record["kept"]:
            return
        if run.shared_trunk:  # into a build with heads: the tuned stages become this version's tail
            run.tail = cut_backbone(run.backbone, options.fine_tune.stages)
        else:  # a build of its own: the tuned backbone is the build's, export it again
            run.exported = False

    def annotate(self, run: Run, staged: Path, entry: HeadEntry) -> None:
        entry.train["fine_tune"] = self.tuned.record


@register_method
class SelfTrainingMethod(TrainingMethod):
    """`--unlabeled DIR` (`training.semi`): rounds of pseudo-labels on the folder's embeddings replace the fit."""

    name = "self-training"
    trains_head = True
    folder: ImageFolderData
    pool: np.ndarray
    outcome: SelfTrainResult

    @staticmethod
    def wanted(options: BuildOptions) -> bool:
        return options.unlabeled is not None

    def check(self, options: BuildOptions, data: ImageFolderData, folders: list[ImageFolderData]) -> None:
        options.self_training.check()
        assert options.unlabeled is not None  # wanted() selected this method
        self.folder = _read_once(folders, options.unlabeled, data)

    def prepare(self, run: Run, embed: Embed) -> None:
        self.pool = embed(self.folder)

    def train(self, run: Run) -> None:
        # every embedding at once (CORAL's aligned rows, else the cache's shards read whole)
        inputs = run.inputs if isinstance(run.inputs, torch.Tensor) else torch.from_numpy(run.extraction.array)
        train, val, targets = run.train_idx, run.val_idx, run.targets
        self.outcome = self_train(
            run.make_head,
            inputs[train],
            targets[train],
            inputs[val],
            targets[val],
            torch.from_numpy(self.pool),
            run.options.train,
            run.options.self_training,
            run.options.progress,
        )
        run.head, run.result = self.outcome.head, self.outcome.result

    def annotate(self, run: Run, staged: Path, entry: HeadEntry) -> None:
        """Rounds and settings into the head entry; the pseudo-labels it trained on into ``pseudo_labels.json``."""
        semi, folder, classes = self.outcome, self.folder, run.data.classes
        labels = [
            {
                "image": str(folder.paths[i].relative_to(folder.root)),
                "label": classes[label],
                "confidence": round(float(confidence), 6),
            }
            for i, label, confidence in zip(semi.pseudo_index, semi.pseudo_label, semi.pseudo_confidence)
        ]
        (staged / PSEUDO_LABELS_JSON).write_text(json.dumps(labels, indent=1))
        entry.train["self_training"] = semi.record(run.options.self_training)
        entry.data["unlabeled"] = folder_record(folder)


@register_method
class CoralMethod(TrainingMethod):
    """`--target DIR` (`training.adapt`): the labelled embeddings aligned to the target folder's; the head
    standardises with the target's statistics and its drift reference is the target's."""

    name = "coral"
    folder: ImageFolderData

    @staticmethod
    def wanted(options: BuildOptions) -> bool:
        return options.target is not None

    def check(self, options: BuildOptions, data: ImageFolderData, folders: list[ImageFolderData]) -> None:
        assert options.target is not None  # wanted() selected this method
        self.folder = _read_once(folders, options.target, data, "target folder")

    def prepare(self, run: Run, embed: Embed) -> None:
        target = embed(self.folder)
        alignment = coral(run.extraction.array, target)
        run.inputs = torch.from_numpy(alignment.source)  # the labelled images as the target domain would embed them
        run.reference = EmbeddingReference.of(target)  # what this head expects to be served
        run.spec = replace(run.spec, standardise=True)
        run.statistics = (torch.from_numpy(alignment.target_mean), torch.from_numpy(alignment.target_std))

    def annotate(self, run: Run, staged: Path, entry: HeadEntry) -> None:
        entry.train["adaptation"] = {"method": "coral", "eps": CORAL_EPS, "standardise": "per domain"}
        entry.data["target"] = folder_record(self.folder)


@register_method
class FromLogMethod(TrainingMethod):
    """`--from-log LOG` (`training.traffic`): a head version of an existing build from logged embeddings with
    feedback; no image is embedded, so it is the build's entry, not a step of it."""

    name = "from-log"
    entry = staticmethod(build_from_log)

    @staticmethod
    def wanted(options: BuildOptions) -> bool:
        return options.from_log is not None
