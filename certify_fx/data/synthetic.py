"""A synthetic image classification task, generated in memory from a seed (no files needed)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticImages"]


class SyntheticImages(Dataset):
    """Images in [0, 1] around one random smooth prototype per class, with pixel noise.

    Learnable but not trivial: prototypes are low-frequency patterns, noise is i.i.d. per pixel.
    The same ``seed`` gives the same prototypes for every split; splits differ in their noise.

    Args:
        num_classes, in_chans, img_size: shape of the task.
        size: number of examples.
        split: ``train`` or ``test`` (selects the noise stream).
        noise: standard deviation of the pixel noise.
        seed: seeds prototypes and noise.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 16, size: int = 1024,
                 split: str = "train", noise: float = 0.25, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.rand(num_classes, in_chans, 4, 4, generator=gen)
        prototypes = torch.nn.functional.interpolate(coarse, size=(img_size, img_size), mode="bilinear",
                                                     align_corners=False)
        gen.manual_seed(seed * 2 + (split != "train") + 1)
        self.targets = torch.randint(num_classes, (size,), generator=gen)
        images = prototypes[self.targets] + noise * torch.randn(size, in_chans, img_size, img_size, generator=gen)
        self.images = images.clamp(0, 1)
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])
