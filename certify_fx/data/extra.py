"""Extra training images mixed into every batch (``data.extra`` of a recipe), e.g. the
DDPM-generated sets the LiResNet authors train with ("A Recipe for Improved Certifiable
Robustness", Hu et al., ICLR 2024).

Two formats, both read from local disk:

* an ``.npz`` archive with an ``image`` array (``N x H x W x C``, ``N x C x H x W`` or ``N x H x
  W``; uint8, or floats in [0, 1]) and a ``label`` array (``N``) -- the layout of the published
  generated sets (``images``/``labels`` and ``x``/``y`` are accepted too). It is read without
  pickles and held in memory.
* an image folder whose sub-folders are named by class index (``extra/3/img.png`` is class 3).

The images must have the training set's shape; they get the training set's augmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ..errors import CertifyFxError, DatasetNotFoundError
from .augment import build_transform
from .tensor_images import TensorImages

__all__ = ["extra_dataset"]

_IMAGE_KEYS, _LABEL_KEYS = ("image", "images", "x"), ("label", "labels", "y")


def extra_dataset(path: str | Path, input_shape: tuple[int, int, int], num_classes: int,
                  transform: Callable | None = None) -> Dataset:
    """The extra images at ``path`` as ``(image in [0, 1], label)`` pairs, checked against the
    training set's ``input_shape`` and ``num_classes``.

    Raises:
        DatasetNotFoundError: nothing at ``path``.
        CertifyFxError: the file or folder does not hold images and labels of the expected shape.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _folder(path, input_shape, num_classes, transform)
    if not path.is_file():
        raise DatasetNotFoundError(f"data.extra.path: nothing at {path} (an .npz of images and labels, or a folder "
                                   "of class-index sub-folders)")
    if path.suffix != ".npz":
        raise CertifyFxError(f"data.extra.path: {path} is not an .npz archive or a folder")
    return _npz(path, input_shape, num_classes, transform)


def _pick(arrays: np.lib.npyio.NpzFile, keys: tuple[str, ...], path: Path) -> np.ndarray:
    for key in keys:
        if key in arrays.files:
            return arrays[key]
    raise CertifyFxError(f"data.extra.path: {path} has arrays {sorted(arrays.files)}; expected one of {list(keys)}")


def _npz(path: Path, input_shape: tuple[int, int, int], num_classes: int, transform: Callable | None) -> TensorImages:
    try:
        with np.load(path, allow_pickle=False) as arrays:  # an untrusted file must not run code
            images, labels = _pick(arrays, _IMAGE_KEYS, path), _pick(arrays, _LABEL_KEYS, path)
    except (OSError, ValueError) as exc:
        raise CertifyFxError(f"data.extra.path: cannot read {path} as an .npz archive ({exc})") from None
    images = _channels_first(torch.from_numpy(np.ascontiguousarray(images)), input_shape, path)
    labels = torch.from_numpy(np.asarray(labels)).long().reshape(-1)
    if len(labels) != len(images):
        raise CertifyFxError(f"data.extra.path: {path} has {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CertifyFxError(f"data.extra.path: labels of {path} must be in [0, {num_classes - 1}], found "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    dataset = TensorImages()
    dataset.images, dataset.targets, dataset.transform = images, labels, transform
    return dataset


def _channels_first(images: torch.Tensor, input_shape: tuple[int, int, int], path: Path) -> torch.Tensor:
    c, h, w = input_shape
    if images.dim() == 3 and c == 1:
        images = images[:, None]
    elif images.dim() == 4 and tuple(images.shape[1:]) == (h, w, c) and tuple(images.shape[1:]) != (c, h, w):
        images = images.permute(0, 3, 1, 2)
    if images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
        raise CertifyFxError(f"data.extra.path: images of {path} have shape {tuple(images.shape)}; the training set's "
                             f"are (N, {c}, {h}, {w}) (or N x {h} x {w} x {c})")
    if images.dtype != torch.uint8:
        if not images.is_floating_point() or images.min() < 0 or images.max() > 1:
            raise CertifyFxError(f"data.extra.path: images of {path} must be uint8, or floats in [0, 1]")
        images = (images * 255).round().to(torch.uint8)
    return images.contiguous()


def _folder(path: Path, input_shape: tuple[int, int, int], num_classes: int, transform: Callable | None) -> Dataset:
    names = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not names or not all(n.isdigit() and int(n) < num_classes for n in names):
        raise CertifyFxError(f"data.extra.path: the sub-folders of {path} must be class indices 0..{num_classes - 1}, "
                             f"found {names[:10]}")
    return ImageFolder(str(path), transform=_checked(transform, input_shape, path),
                       target_transform=lambda index: int(names[index]))


def _checked(transform: Callable | None, input_shape: tuple[int, int, int], path: Path) -> Callable:
    """PIL image -> [0, 1] tensor of ``input_shape`` (through ``transform`` if given)."""
    mode = "L" if input_shape[0] == 1 else "RGB"
    to_tensor = build_transform(input_shape[1])

    def load(image) -> torch.Tensor:
        image = image.convert(mode)
        tensor = transform(image) if transform is not None else to_tensor(image)
        if tuple(tensor.shape) != tuple(input_shape):
            raise CertifyFxError(f"data.extra.path: an image under {path} has shape {tuple(tensor.shape)}, the "
                                 f"training set's are {tuple(input_shape)}")
        return tensor

    return load
