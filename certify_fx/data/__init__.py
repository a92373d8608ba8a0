"""Dataset builders. Everything is read from local disk in its standard format; nothing downloads.

==============  ==================================================  ==========================
name            expected on disk (under ``root``)                    default root
==============  ==================================================  ==========================
fashion_mnist   ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``  /usr/share/datasets/fashion-mnist
cifar10         ``cifar-10-batches-py/`` (torchvision format)        ./data
cifar100        ``cifar-100-python/`` (torchvision format)           ./data
tinyimagenet    ``train/<wnid>/...``, ``val/<wnid>/...`` or the      ./data/tiny-imagenet-200
                original ``val/images`` + ``val_annotations.txt``
imagenet        ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``        ./data/imagenet
synthetic       nothing: generated from the seed                     -
==============  ==================================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .augment import AUGMENTATIONS, build_transform
from .cifar import CIFAR
from .extra import extra_dataset
from .fashion_mnist import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST
from .folder import image_folder
from .idx import read_idx
from .synthetic import SyntheticImages
from .two_moons import TWO_MOONS_GAP, two_moons

__all__ = [
    "AUGMENTATIONS",
    "CIFAR",
    "DATASETS",
    "DatasetInfo",
    "FashionMNIST",
    "SyntheticImages",
    "TWO_MOONS_GAP",
    "build_dataset",
    "build_transform",
    "dataset_info",
    "extra_dataset",
    "first_images",
    "read_idx",
    "two_moons",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: classes, input shape, pixel statistics."""

    num_classes: int
    in_chans: int
    img_size: int
    default_root: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.img_size, self.img_size)


_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(10, 1, 28, DEFAULT_FASHION_MNIST_ROOT, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(10, 3, 32, "data", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, 3, 32, "data", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": DatasetInfo(200, 3, 64, "data/tiny-imagenet-200", *_IMAGENET_STATS),
    "imagenet": DatasetInfo(1000, 3, 224, "data/imagenet", *_IMAGENET_STATS),
    "synthetic": DatasetInfo(10, 1, 16, None, (0.5,), (0.25,)),
}


def dataset_info(name: str, **synthetic) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (synthetic shapes may be overridden)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    if name == "synthetic" and synthetic:
        info = DatasetInfo(synthetic.get("num_classes", info.num_classes), synthetic.get("in_chans", info.in_chans),
                           synthetic.get("img_size", info.img_size), None, info.mean * synthetic.get("in_chans", 1),
                           info.std * synthetic.get("in_chans", 1))
    return info


def build_dataset(name: str, split: str, root: str | Path | None = None, augment: Sequence[str] = (),
                  crop_padding: int = 4, synthetic: dict | None = None) -> Dataset:
    """The ``split`` (``train`` or ``test``) of dataset ``name`` as ``(image in [0, 1], label)`` pairs.

    Args:
        name: a key of :data:`DATASETS`.
        split: ``train`` or ``test`` (ImageNet-style folders: ``val``).
        root: where the files are (default: :attr:`DatasetInfo.default_root`).
        augment: augmentation names (applied to the training split only).
        crop_padding: padding of the random crop augmentation.
        synthetic: options of :class:`SyntheticImages` (``size``, ``noise``, ``seed``, shapes).

    Raises:
        DatasetNotFoundError: the files are missing; the message names the expected path.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    info = dataset_info(name, **(synthetic or {}))
    augment = tuple(augment) if split == "train" else ()
    if name == "synthetic":
        options = dict(synthetic or {})
        if split == "test":
            options["size"] = options.pop("test_size", max(options.get("size", 1024) // 4, 1))
        else:
            options.pop("test_size", None)
        return SyntheticImages(split=split, **options)
    root = Path(root or info.default_root).expanduser()
    if name == "fashion_mnist":
        transform = build_transform(info.img_size, augment, crop_padding) if augment else None
        return FashionMNIST(root, split, transform)
    if name in ("cifar10", "cifar100"):
        transform = build_transform(info.img_size, augment, crop_padding) if augment else None
        return CIFAR(root, name, split, transform)
    resize = None if split == "train" or name == "tinyimagenet" else int(info.img_size * 8 / 7)
    transform = build_transform(info.img_size, augment, crop_padding, resize=resize)
    return image_folder(root, split, transform)


def first_images(dataset: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` images of ``dataset`` stacked into one batch (labels dropped): a fixed,
    reproducible sample, e.g. the calibration set of :func:`certify_fx.transforms.calibrate`."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
