"""Global Lipschitz constants of elementwise activations and pooling windows.

Each constant is the supremum of ``|f'(x)|`` over the real line. Closed forms are used where they
exist; smooth activations without one (SiLU, Mish, tanh-GELU) are maximised on a dense float64
grid and rounded up by more than the grid can miss (``h * max|f''| / 2`` with ``|f''| <= 1`` and
``h = 1e-5``), so every constant is an upper bound.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    "GELU",
    "GELU_TANH",
    "SILU",
    "MISH",
    "SIGMOID",
    "HARDSWISH",
    "HARDSIGMOID",
    "SELU",
    "pool_overlap",
    "max_pool_constant",
]

_GRID_SLACK = 1e-5


@lru_cache(maxsize=None)
def _sup_derivative(name: str) -> float:
    fn = {"silu": F.silu, "mish": F.mish, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[name]
    # All three have f'' bounded by 1 and derivative tending to 0 or 1 monotonically outside [-20, 20].
    x = torch.arange(-20.0, 20.0, 1e-5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return max(float(grad.abs().max()), 1.0) + _GRID_SLACK


#: GELU (erf): f' = Phi(x) + x phi(x), maximal at x = sqrt(2).
GELU = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi) + 1e-12
GELU_TANH = _sup_derivative("gelu_tanh")
SILU = _sup_derivative("silu")
MISH = _sup_derivative("mish")
SIGMOID = 0.25
HARDSWISH = 1.5  # f' = (2x + 3) / 6 on (-3, 3)
HARDSIGMOID = 1.0 / 6.0
SELU = 1.0507009873554805 * 1.6732632423543772  # scale * alpha at 0-


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def pool_overlap(n: int, out: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """The largest number of pooling windows that contain one input position along an axis."""
    counts = [0] * n
    for o in range(out):
        for t in range(kernel):
            i = o * stride - padding + t * dilation
            if 0 <= i < n:
                counts[i] += 1
    return max(counts, default=0)


def adaptive_pool_overlap(n: int, out: int) -> int:
    counts = [0] * n
    for o in range(out):
        for i in range((o * n) // out, -(-((o + 1) * n) // out)):
            counts[i] += 1
    return max(counts, default=0)


def max_pool_constant(in_hw, out_hw, kernel, stride, padding, dilation=1) -> float:
    """Max pooling is 1-Lipschitz per window, so its l2 constant is sqrt(max windows per input)."""
    k, s, p, d = _pair(kernel), _pair(stride if stride else kernel), _pair(padding), _pair(dilation)
    overlap = 1
    for a in (0, 1):
        overlap *= pool_overlap(in_hw[a], out_hw[a], k[a], s[a], p[a], d[a])
    return math.sqrt(max(overlap, 1))


def adaptive_max_pool_constant(in_hw, out_hw) -> float:
    return math.sqrt(max(adaptive_pool_overlap(in_hw[0], out_hw[0]) * adaptive_pool_overlap(in_hw[1], out_hw[1]), 1))
