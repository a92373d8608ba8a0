"""Cholesky-orthogonalised layers (CHORD; Hu et al., ICLR 2024, "A Recipe for Improved Certifiable
Robustness"): dense and patch-convolution weights whose rows are made orthonormal in every forward.

With ``V`` the free parameter (``m x n``, ``m <= n``) and ``L`` the Cholesky factor of ``V V^T +
r I``, the layer uses ``Q = L^{-1} V``. Then ``Q Q^T = L^{-1} V V^T L^{-T} = I - r (L L^T)^{-1}``,
so every singular value of ``Q`` is ``s / sqrt(s^2 + r)`` for a singular value ``s`` of ``V``: below
1, and within ``r / (2 s^2)`` of it. The ridge ``r`` keeps the factorisation defined when ``V`` is
rank deficient. Nothing here is taken on trust by the bound compiler: its rule bounds the weight
the forward computes, exactly (an SVD, proven), so a factorisation that lost accuracy only makes
the proven constant differ from 1.

Wider-than-tall weights (``m > n``) orthonormalise their columns instead (``Q^T Q = I``), with the
same guarantees. A patch convolution (``kernel_size == stride``, no padding) is a block-diagonal
map whose norm is the norm of its ``(out, in * k * k)`` weight matrix, so the same orthogonalisation
makes it an exact isometry up to the ridge; that is the neck of the authors' networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CholeskyConv2d", "CholeskyLinear", "cholesky_orthogonal"]


def cholesky_orthogonal(weight: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """``L^{-1} W`` with ``L L^T = W W^T + r I`` (``r = ridge * mean(diag(W W^T))``): ``W`` with its
    rows (or, when it has more rows than columns, its columns) made orthonormal.

    Differentiable; the ridge is computed without gradient, so the map stays smooth in ``W``.
    """
    if weight.dim() != 2:
        raise ValueError(f"cholesky_orthogonal needs a 2-d weight, got shape {tuple(weight.shape)}")
    if weight.shape[0] > weight.shape[1]:
        return cholesky_orthogonal(weight.T, ridge).T
    gram = weight @ weight.T
    shift = gram.diagonal().mean().detach().clamp_min(torch.finfo(gram.dtype).tiny) * ridge
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor = torch.linalg.cholesky(gram + shift * eye)
    return torch.linalg.solve_triangular(factor, weight, upper=False)


class CholeskyLinear(nn.Module):
    """A dense layer ``y = Q x + b`` with ``Q = cholesky_orthogonal(weight)`` (rows or columns
    orthonormal, so ``||Q|| <= 1``).

    Args:
        in_features, out_features: sizes of ``x`` and ``y``.
        bias: learn ``b``.
        identity_init: start at ``Q ~ I`` (square layers only): the free weight is the identity plus
            a small random part scaled by ``init_scale``, as the residual dense blocks of CHORD
            LiResNet start.
        init_scale: size of the random part relative to ``1 / sqrt(features)``.
        ridge: relative ridge of the Cholesky factorisation (see :func:`cholesky_orthogonal`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, identity_init: bool = False,
                 init_scale: float = 1.0, ridge: float = 1e-4) -> None:
        super().__init__()
        if identity_init and in_features != out_features:
            raise ValueError(f"identity_init needs a square layer, got {in_features} -> {out_features}")
        self.in_features, self.out_features, self.ridge = in_features, out_features, ridge
        self.identity_init = identity_init
        weight = torch.randn(out_features, in_features) / in_features**0.5 * init_scale
        if identity_init:
            weight = weight + torch.eye(in_features)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def orthogonal_weight(self) -> torch.Tensor:
        """The weight the forward applies."""
        return cholesky_orthogonal(self.weight, self.ridge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.orthogonal_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"identity_init={self.identity_init}")


class CholeskyConv2d(nn.Module):
    """A patch convolution (``kernel_size == stride``, no padding) whose ``(out, in * k * k)`` weight
    matrix is Cholesky-orthogonalised, so the map is an isometry onto its range (up to the ridge).

    Args:
        in_channels, out_channels: channels.
        patch_size: ``k``, kernel and stride.
        bias: learn a per-channel bias.
        ridge: relative ridge of the Cholesky factorisation.
    """

    def __init__(self, in_channels: int, out_channels: int, patch_size: int = 4, bias: bool = False,
                 ridge: float = 1e-4) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.patch_size, self.ridge = in_channels, out_channels, patch_size, ridge
        fan_in = in_channels * patch_size * patch_size
        self.weight = nn.Parameter(torch.randn(out_channels, fan_in) / fan_in**0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def orthogonal_weight(self) -> torch.Tensor:
        """The 4-d kernel the forward applies."""
        k = self.patch_size
        return cholesky_orthogonal(self.weight, self.ridge).reshape(self.out_channels, self.in_channels, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.orthogonal_weight(), self.bias, stride=self.patch_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, patch_size={self.patch_size}, "
                f"bias={self.bias is not None}")
