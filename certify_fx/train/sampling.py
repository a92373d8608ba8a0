"""Training batches that can be replayed from any step: the key to exact mid-epoch resumption.

Two pieces make the ``k``-th batch of an epoch a pure function of ``(seed, epoch, k)``:

* :class:`ResumableSampler` shuffles like :class:`~torch.utils.data.DistributedSampler` (the
  order depends only on ``seed`` and the epoch) and can start at any position, without drawing
  the skipped samples;
* :class:`SeededSamples` runs each sample's augmentation under its own generator state, seeded
  from ``(seed, epoch, index)``, so a random crop is the same whichever worker process, and
  however many workers or processes, draws it.

A run interrupted after step ``k`` therefore resumes at step ``k + 1`` with the same batches it
would have seen, and the model's own randomness (dropout) is restored from the checkpoint.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["EpochBatches", "ResumableSampler", "SeededSamples", "sample_seed"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed per ``(seed, epoch, index)``."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) & _MASK


class ResumableSampler(DistributedSampler):
    """A :class:`DistributedSampler` that yields ``(epoch, index)`` and can skip ahead.

    ``start_at(n)`` makes the next iteration begin at this process's ``n``-th sample of the epoch
    (reset after one iteration). The epoch travels with each index, so dataset copies held by
    worker processes need no ``set_epoch`` of their own.
    """

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._start = 0

    def start_at(self, position: int) -> None:
        self._start = int(position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        for index in list(super().__iter__())[start:]:
            yield self.epoch, index


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)``; each sample is drawn under its own seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        # Only the CPU generator: augmentations run on the CPU, and torch.manual_seed would also
        # seed every accelerator (80x slower per sample).
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved)


class EpochBatches:
    """One epoch of a :class:`DataLoader`, whose worker processes end with the ``with`` block.

    The training loop's frames can outlive the epoch (a traceback kept by a test or a debugger
    holds them); they hold this handle rather than the loader's iterator, so leaving the block,
    on any path, is what lets the workers go.
    """

    def __init__(self, loader: DataLoader) -> None:
        self._batches: Iterator | None = iter(loader)

    def __enter__(self) -> "EpochBatches":
        return self

    def __exit__(self, *exc: object) -> None:
        self._batches = None

    def __iter__(self) -> "EpochBatches":
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            raise StopIteration
        return next(self._batches)

