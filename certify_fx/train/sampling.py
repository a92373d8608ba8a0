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

__all__ = ["EpochBatches", "MixedSampler", "ResumableSampler", "SeededSamples", "sample_seed"]

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


class MixedSampler(ResumableSampler):
    """Batches that mix two datasets at a fixed ratio: each ``batch_size`` run of indices holds
    ``batch_size - extra_per_batch`` real samples, then ``extra_per_batch`` extra ones, indexing a
    ``ConcatDataset([real, extra])`` (extra indices are offset by ``real_size``).

    The real samples are shuffled and sharded as :class:`ResumableSampler` does, and decide the
    epoch's length. The extra ones come from a permutation of the extra set drawn from
    ``(seed, epoch)``, read in consecutive slices (wrapping around when the epoch needs more than
    the set holds), each process taking every ``num_replicas``-th. So the ``k``-th batch is a pure
    function of ``(seed, epoch, k)`` and ``start_at`` resumes mid-epoch as before.
    """

    def __init__(self, real_size: int, extra_size: int, batch_size: int, extra_per_batch: int, **kwargs: Any) -> None:
        if not 0 < extra_per_batch < batch_size:
            raise ValueError(f"extra_per_batch must be in [1, {batch_size - 1}] for batches of {batch_size}, "
                             f"got {extra_per_batch}")
        if extra_size < 1:
            raise ValueError("the extra dataset is empty")
        super().__init__(range(real_size), drop_last=True, **kwargs)
        self.real_size, self.extra_size = real_size, extra_size
        self.batch_size, self.extra_per_batch = batch_size, extra_per_batch

    @property
    def steps(self) -> int:
        """Batches per epoch (each process)."""
        return self.num_samples // (self.batch_size - self.extra_per_batch)

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def _extra_indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.extra_size, generator=generator)
        wanted = self.steps * self.extra_per_batch * self.num_replicas
        positions = torch.arange(self.rank, wanted, self.num_replicas) % self.extra_size
        return (order[positions] + self.real_size).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        real = list(DistributedSampler.__iter__(self))
        extra, n_real, n_extra = self._extra_indices(), self.batch_size - self.extra_per_batch, self.extra_per_batch
        stream = []
        for k in range(self.steps):
            stream += real[k * n_real:(k + 1) * n_real] + extra[k * n_extra:(k + 1) * n_extra]
        for index in stream[start:]:
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

