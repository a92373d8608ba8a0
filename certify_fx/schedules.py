"""Schedules of a training run, each kind in one table: the training radius (eps) and the
learning rate, as functions of (fractional) training progress. Recipes check their
``eps.schedule`` and ``optim.schedule`` against these tables."""

from __future__ import annotations

import math
from typing import Callable

from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

__all__ = ["EPS_SCHEDULES", "LR_SCHEDULES", "eps_schedule", "linear_ramp", "lr_scheduler"]


def linear_ramp(start: float, end: float, t: float, duration: float) -> float:
    """``start + (end - start) * min(t / duration, 1)`` (GloRo's "x, y, e" schedule)."""
    if duration <= 0:
        return end
    return start + (end - start) * min(max(t / duration, 0.0), 1.0)


def _log_ramp(low: float, high: float, t: float, duration: float) -> float:
    r = min(max(t / duration, 0.0), 1.0) if duration > 0 else 1.0
    return low + (high - low) * math.log1p(9 * r) / math.log(10)


#: eps schedules by name: ``(low, high, t, ramp) -> eps_t`` with ``low = start * eps``,
#: ``high = train_multiplier * eps`` and ``ramp = ramp_fraction * epochs``
EPS_SCHEDULES: dict[str, Callable[[float, float, float, float], float]] = {
    "liresnet": linear_ramp,  # with the paper's start 0.1, multiplier 2, half the epochs (see eps_schedule)
    "linear": linear_ramp,
    "log": _log_ramp,
    "fixed": lambda low, high, t, ramp: high,
}


def eps_schedule(kind: str, eps: float, epoch: float, epochs: float, start: float = 0.1,
                 train_multiplier: float = 2.0, ramp_fraction: float = 0.5) -> float:
    """The training radius at (fractional) ``epoch`` of ``epochs``.

    - ``liresnet`` (Hu et al., App. B): ``(min(2t/T, 1) * 1.9 + 0.1) * eps``;
    - ``linear``: ``start * eps`` to ``train_multiplier * eps`` over ``ramp_fraction * T`` epochs;
    - ``log``: the same range, ramped logarithmically (fast at first; GloRo App. B);
    - ``fixed``: ``train_multiplier * eps`` throughout.
    """
    if kind not in EPS_SCHEDULES:
        raise ValueError(f"unknown eps schedule {kind!r}; choose {', '.join(EPS_SCHEDULES)}")
    if kind == "liresnet":
        start, train_multiplier, ramp_fraction = 0.1, 2.0, 0.5
    return EPS_SCHEDULES[kind](start * eps, train_multiplier * eps, epoch, ramp_fraction * epochs)


#: learning-rate schedules by name (timm schedulers, stepped per training step after a warm-up):
#: ``(optimizer, total_steps, min_lr, milestone_steps, decay_rate, warmup) -> scheduler``
LR_SCHEDULES: dict[str, Callable[..., Scheduler]] = {
    "cosine": lambda opt, total, min_lr, milestones, rate, warmup: CosineLRScheduler(
        opt, t_initial=total, lr_min=min_lr, **warmup),
    "constant": lambda opt, total, min_lr, milestones, rate, warmup: StepLRScheduler(
        opt, decay_t=total + 1, decay_rate=1.0, **warmup),
    "multistep": lambda opt, total, min_lr, milestones, rate, warmup: MultiStepLRScheduler(
        opt, decay_t=milestones, decay_rate=rate, **warmup),
}


def lr_scheduler(kind: str, optimizer: Optimizer, total_steps: int, *, warmup_steps: int = 0,
                 warmup_lr: float = 0.0, min_lr: float = 0.0, milestone_steps: list[int] | None = None,
                 decay_rate: float = 0.1) -> Scheduler:
    """The timm scheduler of ``kind`` for a run of ``total_steps`` optimiser steps."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose {', '.join(LR_SCHEDULES)}")
    warmup = dict(warmup_t=warmup_steps, warmup_lr_init=warmup_lr, t_in_epochs=False)
    return LR_SCHEDULES[kind](optimizer, total_steps, min_lr, milestone_steps or [], decay_rate, warmup)
