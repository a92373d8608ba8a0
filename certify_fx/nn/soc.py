"""Skew-orthogonal convolution (SOC; Singla & Feizi, 2021) and the proven bound of its truncation.

SOC computes ``exp(A) x`` for a convolution ``A`` whose kernel is skew: ``K = L - flip(L)^T``
(channels transposed, taps flipped), so that with "same" zero padding ``A`` is exactly minus its
adjoint (the adjoint of a stride-1 conv is the transposed conv, i.e. the conv with the flipped,
channel-transposed kernel and padding ``k - 1 - p = p``). ``exp(A)`` would be orthogonal; the layer
evaluates the truncated series ``p_n(A) x = sum_{i <= n} A^i x / i!`` (``n`` convolutions), whose
norm is slightly above 1. Channels are expanded by zero padding and stride ``s`` is a
space-to-depth rearrangement (both isometries); the output keeps the first ``out_channels``
channels (a projection, norm <= 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SOC", "truncated_exp_norm_bound"]


def truncated_exp_norm_bound(radius: float, terms: int, grid: int = 4097) -> float:
    """A proven upper bound on ``||p_n(A)||`` for every skew-adjoint ``A`` with ``||A|| <= radius``.

    Proof. ``A^* = -A`` makes ``A`` normal with spectrum in ``i[-r, r]`` (``r = radius``), and a
    polynomial of a normal operator is normal with eigenvalues ``p(i t)``; the norm of a normal
    operator is its spectral radius, so ``||p_n(A)|| <= max_{|t| <= r} |p_n(i t)|``. Because
    ``p_n`` has real coefficients, ``|p_n(-i t)| = |p_n(i t)|`` and ``t`` ranges over ``[0, r]``.
    With ``R(t), I(t)`` the even and odd parts, ``q = |p_n(i t)|^2 = R^2 + I^2`` is a polynomial
    whose derivative on ``[0, r]`` is at most ``D = 2 (R+(r) R+'(r) + I+(r) I+'(r))``, where ``R+``
    and ``I+`` sum the absolute values of the coefficients (so they bound ``|R|, |I|`` and their
    derivatives there). Between grid points ``h`` apart, ``q`` exceeds the larger endpoint by at
    most ``h D / 2``. Independently, ``|e^{i t}| = 1`` and the Taylor remainder on the imaginary
    axis is at most ``t^{n+1} / (n+1)!``, so ``|p_n(i t)| <= 1 + r^{n+1} / (n+1)!``. The smaller of
    the two bounds is returned, rounded up.
    """
    if not math.isfinite(radius) or radius < 0:
        return math.inf
    n = int(terms)
    remainder = 1.0 + radius ** (n + 1) / math.factorial(n + 1)
    t = torch.linspace(0.0, radius, grid, dtype=torch.float64)
    real = sum((-1) ** (k // 2) * t**k / math.factorial(k) for k in range(0, n + 1, 2))
    imag = sum((-1) ** (k // 2) * t**k / math.factorial(k) for k in range(1, n + 1, 2))
    q_max = float((real**2 + imag**2).max())
    evens, odds = range(0, n + 1, 2), range(1, n + 1, 2)
    slope = 2 * (_abs_sum(evens, radius) * _abs_sum_derivative(evens, radius)
                 + _abs_sum(odds, radius) * _abs_sum_derivative(odds, radius))
    step = radius / (grid - 1) if grid > 1 else radius
    on_grid = math.sqrt(q_max + step * slope / 2)
    return min(on_grid, remainder) * (1 + 1e-12)


def _abs_sum(powers: range, r: float) -> float:
    """``sum_k r^k / k!``: bounds ``|sum_k +-t^k / k!|`` on ``[0, r]``."""
    return sum(r**k / math.factorial(k) for k in powers)


def _abs_sum_derivative(powers: range, r: float) -> float:
    """``sum_k k r^(k-1) / k!``: bounds the derivative of ``sum_k +-t^k / k!`` on ``[0, r]``."""
    return sum(k * r ** (k - 1) / math.factorial(k) for k in powers if k > 0)


class _FastGradientSeries(torch.autograd.Function):
    """``p_n(A) x`` with the paper's faster gradients (Singla & Feizi, 2022, Section 4).

    Forward: ``u^(n) = x``, ``u^(i) = x + A u^(i+1) / (i+1)``, ``z = u^(0)``. Input gradient (exact):
    ``v^(n) = g``, ``v^(i) = g - A v^(i+1) / (i+1)``, ``dx = v^(0) = p_n(A)^T g`` since ``A^T = -A``.
    Kernel gradient (approximate, equation (5)): one convolution weight gradient of
    ``<v^(1), A u^(1)>`` instead of one per term; exact for ``n = 1``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, terms: int, padding: int) -> torch.Tensor:
        u, u1 = x, x
        for i in range(terms - 1, -1, -1):
            u = x + F.conv2d(u, kernel, padding=padding) / (i + 1)
            if i == 1:
                u1 = u
        ctx.save_for_backward(u1, kernel)
        ctx.terms, ctx.padding = terms, padding
        return u

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u1, kernel = ctx.saved_tensors
        v, v1 = grad, grad
        for i in range(ctx.terms - 1, -1, -1):
            v = grad - F.conv2d(v, kernel, padding=ctx.padding) / (i + 1)
            if i == 1:
                v1 = v
        grad_kernel = torch.nn.grad.conv2d_weight(u1, kernel.shape, v1, padding=ctx.padding)
        return v, grad_kernel, None, None


class SOC(nn.Module):
    """``x -> p_n(A) x + b``: a skew-orthogonal convolution (norm slightly above 1).

    Args:
        in_channels, out_channels: channels in and out (``out`` may be smaller or larger).
        kernel_size: odd kernel size of ``L``.
        stride: 1, or s: space-to-depth by s first (``in_channels * s^2`` channels).
        train_terms, eval_terms: convolutions in the truncated series in training and in eval
            mode (the paper uses more at test time: the series is closer to orthogonal).
        bias: add a learned bias.
        fast_gradients: in training, compute the kernel gradient from one convolution weight
            gradient (equation (5) of the paper; approximate) instead of one per term.
        max_norm: ``L`` is rescaled in every forward so that a cheap bound on its norm,
            ``k ||L||_F``, is at most this (so ``||A|| <= 2 max_norm`` and the series converges
            fast); a parametrisation choice, not part of the certificate, which uses the proven
            bound of the actual kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 train_terms: int = 6, eval_terms: int = 12, bias: bool = True, max_norm: float = 0.7,
                 fast_gradients: bool = False) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"SOC needs an odd kernel size (its adjoint must keep the padding), got {kernel_size}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.channels = max(in_channels * stride * stride, out_channels)
        self.kernel_size, self.train_terms, self.eval_terms, self.max_norm = kernel_size, train_terms, eval_terms, max_norm
        self.fast_gradients = fast_gradients
        self.weight = nn.Parameter(torch.randn(self.channels, self.channels, kernel_size, kernel_size)
                                   / (self.channels * kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def terms(self) -> int:
        return self.train_terms if self.training else self.eval_terms

    def skew_kernel(self) -> torch.Tensor:
        """``K = L - flip(L)^T`` for the rescaled ``L``: the conv kernel of ``A``."""
        norm = self.kernel_size * self.weight.norm()
        weight = self.weight * (self.max_norm / norm.clamp_min(self.max_norm))
        return weight - weight.transpose(0, 1).flip(2, 3)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Space-to-depth and zero channels: the isometry that brings ``x`` to ``A``'s input."""
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        extra = self.channels - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)
        kernel, padding = self.skew_kernel(), self.kernel_size // 2
        if self.fast_gradients and self.training and torch.is_grad_enabled():
            out = _FastGradientSeries.apply(x, kernel, self.terms, padding)
        else:
            out = term = x
            for i in range(1, self.terms + 1):
                term = F.conv2d(term, kernel, padding=padding) / i
                out = out + term
        out = out[:, : self.out_channels]
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"terms={self.train_terms}/{self.eval_terms}" + (", fast_gradients" if self.fast_gradients else ""))
