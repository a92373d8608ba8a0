"""Graceful stops: Ctrl-C or SIGTERM ends training at the next step boundary, after a checkpoint.

The first signal only sets a flag (the step in flight finishes, so no state is half-updated); the
trainer then writes a checkpoint and raises :class:`TrainingInterrupted`. A second Ctrl-C stops at
once, as usual. Under ``torchrun`` every process may see the signal at a different step, so the
flag is agreed on by all processes before anyone stops.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Callable

import torch
import torch.distributed as dist

from .distributed import DistributedContext

__all__ = ["StopRequest", "TrainingInterrupted", "leave_stops_to_the_trainer"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal; ``checkpoint`` is where it can be resumed from."""

    def __init__(self, signal_name: str, checkpoint: Path | None, step: int) -> None:
        super().__init__(f"{signal_name} at step {step}")
        self.signal_name, self.checkpoint, self.step = signal_name, checkpoint, step


class StopRequest:
    """A context manager that turns SIGINT/SIGTERM into a flag the training loop polls."""

    def __init__(self, ctx: DistributedContext) -> None:
        self.ctx = ctx
        self.signal_name: str | None = None
        self._previous: dict[int, Callable | int | None] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any process was asked to stop (a collective call under ``torchrun``)."""
        if not self.ctx.distributed:
            return self.signal_name is not None
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(flag.item())

    def interruption(self, checkpoint: Path, step: int) -> TrainingInterrupted:
        """The exception to raise once the checkpoint of ``step`` is written."""
        return TrainingInterrupted(self.signal_name or "a signal", checkpoint, step)


def leave_stops_to_the_trainer(worker_id: int) -> None:
    """``worker_init_fn`` of data-loader workers.

    Ctrl-C in a terminal signals the whole process group; a worker killed by it would break the
    step the main process is finishing, so workers ignore SIGINT and the trainer shuts them down.
    SIGTERM, though, is also how ``multiprocessing`` ends daemon workers at interpreter exit (and
    then waits for them), so a worker must obey it: it leaves at once, with status 0 because torch
    turns a worker killed by a signal into an error raised mid-step in the main process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_quietly)


def _leave_quietly(signum: int, frame: FrameType | None) -> None:
    os._exit(0)
