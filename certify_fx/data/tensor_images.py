"""A dataset of uint8 images held in memory as one tensor (the small standard datasets)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

__all__ = ["TensorImages"]


class TensorImages(Dataset):
    """``images`` (N, C, H, W) uint8 and ``targets`` (N,); ``transform`` maps a uint8
    ``tv_tensors.Image`` to a float tensor (default: scale to [0, 1])."""

    images: torch.Tensor
    targets: torch.Tensor
    transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = tv_tensors.Image(self.images[index])
        image = self.transform(image) if self.transform else image.float() / 255
        return image, int(self.targets[index])
