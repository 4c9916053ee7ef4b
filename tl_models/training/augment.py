"""Training-time augmentation for fine-tuning: per-image random resized crop and horizontal flip on uint8 batches."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

CROP_SCALE = (0.5, 1.0)  # share of the image a random crop keeps (RandomResizedCrop's scale)


class Augment:
    """uint8 N×3×H×W -> uint8 N×3×H×W, each image cropped and flipped on its own draw (torch's global RNG, which
    ``train.fit`` seeds)."""

    def __init__(self, size: int, kinds: tuple[str, ...]):
        steps = []
        if "crop" in kinds:
            steps.append(v2.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True))
        if "flip" in kinds:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps) if steps else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return batch
        return torch.stack([self.transform(image) for image in batch])
