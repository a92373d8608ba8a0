"""Projection pooling (Singla & Feizi, 2022, Section 6): halve the channels with a 1-Lipschitz
signed distance to a learned curve."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ProjectionPool2d"]


class ProjectionPool2d(nn.Module):
    """``(N, 2q, H, W) -> (N, q, H, W)``: channel ``c`` of the output is the signed l2 distance of
    the point ``(x, y) = (z_c, z_{c+q})`` to the curve ``M_theta``, two rays from the origin at
    angles ``+-theta`` (equation (9); ``theta`` learned per channel, kept in ``(0, pi/2)``).

    With ``u = (cos theta, sin theta)``: for ``y >= 0`` and ``u . (x, y) >= 0`` the distance is
    ``y cos theta - x sin theta``; for ``y < 0`` and ``(cos theta, -sin theta) . (x, y) >= 0`` it is
    ``-(y cos theta + x sin theta)``; otherwise the nearest point of ``M`` is the origin and it is
    ``sqrt(x^2 + y^2)``. The sign is negative inside the wedge ``|angle| < theta``.

    Why 1-Lipschitz: ``M`` divides the plane into the wedge and its complement, and the signed
    distance to such a boundary is 1-Lipschitz (paper, Theorem 2 and Corollary 1): along any
    segment from ``a`` to ``b`` it changes by at most the segment's length, because the unsigned
    distance to ``M`` does, and the sign can only flip where the segment crosses ``M``, where the
    distance is 0. The output channels read disjoint input pairs, so the whole map is 1-Lipschitz.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"ProjectionPool2d pairs channel c with c + C/2; {channels} channels is odd")
        self.channels = channels
        self.angle = nn.Parameter(torch.zeros(channels // 2))  # theta = pi/2 * sigmoid(angle): pi/4 at start

    def theta(self) -> torch.Tensor:
        return math.pi / 2 * torch.sigmoid(self.angle)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x, y = z.chunk(2, dim=1)
        theta = self.theta().view(1, -1, 1, 1)
        c, s = theta.cos(), theta.sin()
        upper = (y >= 0) & (x * c + y * s >= 0)
        lower = (y < 0) & (x * c - y * s >= 0)
        squared = x * x + y * y
        zero = squared == 0  # sqrt'(0) is infinite: take sqrt(1) there, then 0
        radius = torch.where(zero, 0.0, torch.where(zero, torch.ones_like(squared), squared).sqrt())
        return torch.where(upper, y * c - x * s, torch.where(lower, -(y * c + x * s), radius))

    def extra_repr(self) -> str:
        return f"{self.channels} -> {self.channels // 2}"
