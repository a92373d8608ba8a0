"""Training augmentations by name, from torchvision's v2 transforms (as the papers use them)."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["AUGMENTATIONS", "ToUnitRange", "build_transform"]

#: Recipe names of the augmentations (LiResNet App. B: crop, RandAugment, flip; Cutout on Tiny-ImageNet).
AUGMENTATIONS = ("crop", "resized_crop", "flip", "randaugment", "cutout")


class ToUnitRange(torch.nn.Module):
    """uint8 pixels -> float32 in [0, 1] as ``x / 255``: bit for bit what ``ToTensor`` (and so
    timm's eval pipeline) gives, where ``ToDtype(scale=True)`` multiplies by ``1 / 255`` and can
    differ in the last bit, which would make radii differ between the two pipelines."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32) / 255


def build_transform(img_size: int, augment: Sequence[str] = (), crop_padding: int = 4,
                    resize: int | None = None) -> v2.Compose:
    """PIL image or uint8 tensor -> float tensor in [0, 1], with ``augment`` applied in recipe order.

    Args:
        img_size: output side.
        augment: names from :data:`AUGMENTATIONS` (empty for evaluation).
        crop_padding: zero padding of the random crop.
        resize: resize the shorter side to this, then centre-crop ``img_size`` (ImageNet evaluation).
    """
    unknown = [a for a in augment if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(AUGMENTATIONS)}")
    steps: list = [v2.ToImage()]
    if resize:
        steps += [v2.Resize(resize, antialias=True), v2.CenterCrop(img_size)]
    for name in augment:
        if name == "crop":
            steps.append(v2.RandomCrop(img_size, padding=crop_padding))
        elif name == "resized_crop":
            steps.append(v2.RandomResizedCrop(img_size, antialias=True))
        elif name == "flip":
            steps.append(v2.RandomHorizontalFlip())
        elif name == "randaugment":
            steps.append(v2.RandAugment())
    steps.append(ToUnitRange())
    if "cutout" in augment:
        steps.append(v2.RandomErasing(value=0))
    return v2.Compose(steps)
