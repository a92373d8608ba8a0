"""CIFAR-10/100 in torchvision's on-disk format (the python pickles), read without running code.

The batches are pickles; an untrusted pickle can run code when loaded, so they are read with an
unpickler that only rebuilds plain containers and numpy arrays.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DatasetNotFoundError
from .tensor_images import TensorImages

__all__ = ["CIFAR"]

_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _load_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    return {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}


class CIFAR(TensorImages):
    """CIFAR-10 or CIFAR-100 as ``(3, 32, 32)`` images.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        name: ``cifar10`` or ``cifar100``.
        split: ``train`` or ``test``.
        transform: applied to each uint8 ``tv_tensors.Image``; default scales to [0, 1].
    """

    def __init__(self, root: str | Path, name: str = "cifar10", split: str = "train",
                 transform: Callable | None = None) -> None:
        folder, train_files, test_files, label_key = _LAYOUT[name]
        base = Path(root) / folder
        files = train_files if split == "train" else test_files
        missing = [f for f in files if not (base / f).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"{name} not found: expected {base / missing[0]} (torchvision's python format, the "
                f"{folder}/ folder). Download it on a machine with internet (e.g. torchvision's "
                f"{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}(root, download=True)), copy it here, or set data.root")
        images, labels = [], []
        for f in files:
            try:
                batch = _load_batch(base / f)
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(v) for v in batch[label_key])
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
                raise DatasetNotFoundError(f"{base / f} is not a valid {name} batch: {exc}") from None
        self.images = torch.from_numpy(np.concatenate(images))
        self.targets = torch.tensor(labels, dtype=torch.long)
        self.transform = transform
