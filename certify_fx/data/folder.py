"""ImageFolder datasets (Tiny-ImageNet, ImageNet), including Tiny-ImageNet's original val layout."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

from ..errors import DatasetNotFoundError

__all__ = ["image_folder"]


class _AnnotatedFolder(ImageFolder):
    """Tiny-ImageNet's ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``."""

    def __init__(self, root: Path, classes: list[str], transform: Callable | None) -> None:
        self.root, self.transform, self.target_transform, self.loader = str(root), transform, None, default_loader
        self.classes, self.class_to_idx = classes, {c: i for i, c in enumerate(classes)}
        lines = (root / "val_annotations.txt").read_text().splitlines()
        self.samples = [(str(root / "images" / parts[0]), self.class_to_idx[parts[1]])
                        for parts in (line.split("\t") for line in lines if line.strip())]
        self.imgs, self.targets = self.samples, [s[1] for s in self.samples]


def image_folder(root: Path, split: str, transform: Callable | None) -> ImageFolder:
    """``root/train`` for training, ``root/val`` (or ``root/test``) for evaluation."""
    train = root / "train"
    if not train.is_dir():
        raise DatasetNotFoundError(f"no image folder at {train}/ (expected {train}/<class>/<image>); "
                                   "set data.root to the dataset folder")
    if split == "train":
        return ImageFolder(str(train), transform=transform)
    val = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if val is None:
        raise DatasetNotFoundError(f"no evaluation folder at {root / 'val'}/ (expected {root / 'val'}/<class>/<image>)")
    if (val / "val_annotations.txt").is_file():
        return _AnnotatedFolder(val, ImageFolder(str(train)).classes, transform)
    return ImageFolder(str(val), transform=transform)
