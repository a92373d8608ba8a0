"""Fashion-MNIST from its IDX files on disk (Debian: ``apt-get install -y dataset-fashion-mnist``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


from ..errors import DatasetNotFoundError
from .tensor_images import TensorImages
from .idx import read_idx

__all__ = ["DEFAULT_FASHION_MNIST_ROOT", "FashionMNIST"]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_PREFIX = {"train": "train", "test": "t10k"}


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, f"FashionMNIST/raw/{stem}", f"FashionMNIST/raw/{stem}.gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found: expected {root / stem}.gz (IDX format). Install it with "
        "`apt-get install -y dataset-fashion-mnist` (files go to /usr/share/datasets/fashion-mnist) "
        "or set data.root to a folder holding the four IDX files")


class FashionMNIST(TensorImages):
    """The 60,000 / 10,000 28x28 grey images of Fashion-MNIST as ``(1, 28, 28)`` images.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: ``train`` or ``test``.
        transform: applied to each uint8 ``tv_tensors.Image``; default scales to float in [0, 1].
    """

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

    def __init__(self, root: str | Path = DEFAULT_FASHION_MNIST_ROOT, split: str = "train",
                 transform: Callable | None = None) -> None:
        if split not in _PREFIX:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        self.images = read_idx(_find(root, f"{_PREFIX[split]}-images-idx3-ubyte"))[:, None]
        self.targets = read_idx(_find(root, f"{_PREFIX[split]}-labels-idx1-ubyte")).long()
        if len(self.images) != len(self.targets):
            raise ValueError(f"Fashion-MNIST {split}: {len(self.images)} images but {len(self.targets)} labels")
        self.transform = transform
