"""Training and self-training settings, torch-free so that the CLI can show their defaults without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import BadRequest

ENGINES = ("auto", "onnxruntime", "torch")  # feature extraction (training.extract)
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and stopping settings."""

    epochs: int = 50
    lr: float = 1e-2
    backbone_lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 10
    seed: int = 0


@dataclass(frozen=True)
class SelfTraining:
    """Self-training settings: rounds after the labelled-only one, confidence threshold, per-class cap."""

    rounds: int = 5
    threshold: float = 0.9
    cap: int | None = None  # pseudo-labels per class; None: an equal share of the unlabelled images
    # False: every round runs, labelled by the round before, and the last is kept. For validation splits too small
    # to tell rounds apart (one image per class); it also no longer stops on a hopeless unlabelled folder
    stop: bool = True

    def check(self) -> SelfTraining:
        if self.rounds < 1:
            raise BadRequest(f"self-training needs at least 1 round, got {self.rounds}")
        if not 0.0 < self.threshold < 1.0:
            raise BadRequest(f"pseudo-label confidence threshold must be between 0 and 1, got {self.threshold}")
        if self.cap is not None and self.cap < 1:
            raise BadRequest(f"pseudo-labels per class must be at least 1, got {self.cap}")
        return self


AUGMENTATIONS = ("crop", "flip")


@dataclass(frozen=True)
class FineTune:
    """The fine-tuning recipe's stage 2: after the head trained on cached features, the backbone's last ``stages``
    train with it at ``lr`` on augmented images (BatchNorm statistics frozen), early-stopped on validation.
    ``stages`` 0: no stage 2 (a frozen backbone)."""

    stages: int = 0
    lr: float | None = None  # None: the head's learning rate / 1000
    epochs: int = 15
    augment: tuple[str, ...] = AUGMENTATIONS

    def check(self) -> FineTune:
        if self.stages < 0:
            raise BadRequest(f"--fine-tune takes a number of backbone stages (0 or more), got {self.stages}")
        if self.lr is not None and self.lr <= 0:
            raise BadRequest(f"--fine-tune-lr must be positive, got {self.lr}")
        if self.epochs < 1:
            raise BadRequest(f"--fine-tune-epochs must be at least 1, got {self.epochs}")
        unknown = set(self.augment) - set(AUGMENTATIONS)
        if unknown:
            raise BadRequest(
                f"unknown augmentation {', '.join(sorted(unknown))}; use {', '.join(AUGMENTATIONS)} or none"
            )
        return self

    def learning_rate(self, head_lr: float) -> float:
        """Stage 2's learning rate: the one given, else 1/1000 of the head's (1e-5 at the default --lr: Adam's first
        steps move every weight by about the learning rate, and at 1/100 the first stage-2 epoch undid most of
        stage 1 on the digits before recovering)."""
        return self.lr if self.lr is not None else head_lr / 1000
