"""torch.distributed helpers: one code path for a single process and for ``torchrun``.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the process group is initialised with NCCL when
CUDA is available and gloo otherwise; without it everything degrades to world size 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

__all__ = ["DistributedContext", "all_gather_objects", "all_reduce_sum", "shard"]


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistributedContext":
        """Join the process group ``torchrun`` describes (if any) and pick this process's device."""
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available; use device=auto or cpu")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
        if use_cuda:
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        return cls(rank, world, local, dev, owns)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistributedContext) -> list[float]:
    """Element-wise sum of ``values`` over all processes (in float64)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: object, ctx: DistributedContext) -> list[object]:
    """``obj`` of every process, in rank order (a one-element list without ``torchrun``)."""
    if not ctx.distributed:
        return [obj]
    gathered: list[object] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(dataset: Dataset, ctx: DistributedContext) -> Dataset:
    """This process's share of ``dataset`` for evaluation: every ``world_size``-th point from ``rank``
    (the shards are disjoint and cover it; counts are then summed with :func:`all_reduce_sum`)."""
    return Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size)) if ctx.distributed else dataset
