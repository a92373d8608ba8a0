"""Power iteration: the cheap estimate of an operator norm, with iterates persisted as buffers."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .norms import NormBound
from .operators import Conv2d, Dense, LinearOperator

__all__ = ["PowerIteration", "layer_operator", "power_iteration"]


def power_iteration(
    apply: Callable[[torch.Tensor], torch.Tensor],
    adjoint: Callable[[torch.Tensor], torch.Tensor],
    vector: torch.Tensor,
    steps: int = 100,
    tol: float | None = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate ``||A||`` by power iteration on ``A^T A``; an estimate from *below*, never a bound.

    Args:
        apply, adjoint: the operator and its transpose, on batched tensors.
        vector: the starting iterate (batch of one), e.g. a persisted buffer.
        steps: maximum number of iterations (0 just evaluates the current iterate).
        tol: stop when the estimate changes by less than this relative amount.

    Returns:
        ``(sigma, vector)``: the estimate ``||A v||`` with gradient flowing through this one final
        application only, and the detached, normalised iterate to persist.
    """
    with torch.no_grad():
        v = vector / vector.norm().clamp_min(1e-30)
        previous = None
        for _ in range(steps):
            w = adjoint(apply(v))
            norm = w.norm()
            if norm == 0:
                break
            v = w / norm
            sigma = norm.sqrt().item()
            if tol is not None and previous is not None and abs(sigma - previous) <= tol * sigma:
                break
            previous = sigma
    v = v.detach()
    return apply(v).norm(), v


def layer_operator(layer: nn.Module, input_shape: tuple[int, ...]) -> LinearOperator:
    """The linear part (no bias) of a Linear or zero-padded Conv2d on inputs of ``input_shape``."""
    if isinstance(layer, nn.Linear):
        return Dense(tuple(input_shape), layer.weight)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"PowerIteration supports zero-padded convs with integer padding, got {layer}")
        ph, pw = layer.padding
        return Conv2d(tuple(input_shape), layer.weight, layer.stride, (ph, ph, pw, pw), layer.dilation, layer.groups)
    raise TypeError(f"PowerIteration supports nn.Linear and nn.Conv2d, got {type(layer).__name__}")


class PowerIteration(nn.Module):
    """Tracks ``||layer||_2`` (bias excluded) across training steps.

    The iterate is a buffer allocated from ``input_shape`` (not lazily at the first batch), so it is
    saved in ``state_dict`` and training can afford a single step per forward. The returned
    estimate carries gradient through one final application of the layer only.

    Example:
        >>> conv = nn.Conv2d(16, 16, 3, padding=1)
        >>> norm = PowerIteration(conv, (16, 32, 32))
        >>> sigma = norm(steps=1)            # training: one step, differentiable
        >>> sigma = norm.converge(tol=1e-6)  # evaluation: run to a tolerance
        >>> norm.upper_bound().value >= sigma.item()
        True
    """

    vector: torch.Tensor

    def __init__(self, layer: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.input_shape = tuple(input_shape)
        layer_operator(layer, self.input_shape)  # validate early
        generator = torch.Generator().manual_seed(seed)
        weight = layer.weight
        vector = torch.randn(1, *self.input_shape, generator=generator).to(weight.dtype).to(weight.device)
        self.register_buffer("vector", vector / vector.norm())

    def forward(self, steps: int = 1, tol: float | None = None) -> torch.Tensor:
        op = layer_operator(self.layer, self.input_shape)
        sigma, vector = power_iteration(op.apply, op.adjoint, self.vector, steps, tol)
        self.vector.copy_(vector)
        return sigma

    @torch.no_grad()
    def converge(self, tol: float = 1e-6, max_steps: int = 1000) -> torch.Tensor:
        """Iterate until the estimate changes by less than ``tol`` (relative); still an estimate."""
        return self.forward(max_steps, tol)

    def upper_bound(self) -> NormBound:
        """The sound bound (exact SVD for Linear, FFT bound for Conv2d)."""
        op = layer_operator(self.layer, self.input_shape)
        return op.upper_bound()

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}"
