"""Training-radius and TRADES-lambda schedules, as functions of (fractional) training progress."""

from __future__ import annotations

import math

__all__ = ["eps_schedule", "linear_ramp"]


def linear_ramp(start: float, end: float, t: float, duration: float) -> float:
    """``start + (end - start) * min(t / duration, 1)`` (GloRo's "x, y, e" schedule)."""
    if duration <= 0:
        return end
    return start + (end - start) * min(max(t / duration, 0.0), 1.0)


def eps_schedule(kind: str, eps: float, epoch: float, epochs: float, start: float = 0.1,
                 train_multiplier: float = 2.0, ramp_fraction: float = 0.5) -> float:
    """The training radius at (fractional) ``epoch`` of ``epochs``.

    - ``liresnet`` (Hu et al., App. B): ``(min(2t/T, 1) * 1.9 + 0.1) * eps``;
    - ``linear``: ``start * eps`` to ``train_multiplier * eps`` over ``ramp_fraction * T`` epochs;
    - ``log``: the same range, ramped logarithmically (fast at first; GloRo App. B);
    - ``fixed``: ``train_multiplier * eps`` throughout.
    """
    if kind == "liresnet":
        start, train_multiplier, ramp_fraction = 0.1, 2.0, 0.5
    low, high, ramp = start * eps, train_multiplier * eps, ramp_fraction * epochs
    if kind in ("liresnet", "linear"):
        return linear_ramp(low, high, epoch, ramp)
    if kind == "log":
        r = min(max(epoch / ramp, 0.0), 1.0) if ramp > 0 else 1.0
        return low + (high - low) * math.log1p(9 * r) / math.log(10)
    if kind == "fixed":
        return high
    raise ValueError(f"unknown eps schedule {kind!r}; choose liresnet, linear, log or fixed")
