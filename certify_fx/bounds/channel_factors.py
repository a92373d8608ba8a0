"""Convolutions whose channel mixing factors through a narrower space, and the smaller problem
that has the same norm.

A converted bottleneck ``x + C3(C2(C1(x)))`` folds into one conv whose kernel taps are
``W_t = a [t = t0] I + L B_t R``: ``L`` (``c x r``, the last 1x1 conv) and ``R`` (``r x c``, the
first) are the same at every tap and ``r = c / 4``. The bound compiler keeps these factors next to
the folded kernel (:class:`ChannelFactors`) and bounds the conv by an exact reduction:

**Identity plus factors** (stride 1, no dilation). Let ``Q`` (``c x k``, ``k <= 2r``) be an
orthonormal basis of ``span(L) + span(R^T)`` and ``M_t = a [t = t0] I_k + (Q^T L) B_t (R Q)``.
At every frequency ``w`` of the DFT grid the conv is the matrix ``A(w) = a I + L B(w) R``, and

    ``||A(w)|| = max(|a|, ||M(w)||)`` if ``k < c``, else ``||M(w)||``.

*Proof.* Let ``S = span(Q)``. For ``x`` orthogonal to ``S``, ``R x = 0`` (the rows of ``R``,
the columns of ``R^T``, lie in ``S``), so ``A(w) x = a x``. For ``x`` in ``S``,
``A(w) x = a x + L B(w) R x`` lies in ``S`` (``span(L)`` does). The same holds for
``A(w)^H = conj(a) I + R^T B(w)^H L^T``. So ``S`` and its complement reduce ``A(w)``: it is block
diagonal in the basis ``[Q, Q_perp]`` with blocks ``Q^T A(w) Q = M(w)`` and ``a I``, and the norm
of a block-diagonal matrix is the largest norm of its blocks. The circular conv on the canvas is
block diagonal over the frequencies, each block ``A(w)``, so the conv with kernel ``M`` on the
same canvas has norm ``max_w ||M(w)||``.

**Factors alone** (``a = 0``, any stride, padding or dilation). With ``L = Q_L R_L`` and
``R^T = Q_R R_R`` (thin QR), ``W_t = Q_L (R_L B_t R_R^T) Q_R^T``. Multiplying the output channels by
``Q_L`` (an isometry) and reading the input channels through ``Q_R^T`` (a co-isometry: ``Q_R^T Q_R =
I``) does not change an operator norm, and both commute with padding, striding and dilation,
which act on the spatial axes only. So the conv has the norm of the conv with kernel
``R_L B_t R_R^T`` and the same geometry.

Either way the problem per frequency shrinks from ``c`` to ``k`` (or ``r``) channels: ``(c/k)^3``
fewer flops in the factorisations that prove the maximum (8x at ``r = c/4``).

The factors only ever make a bound cheaper, not different (up to the 1e-7 slack of the proof's
thresholds): they are tied to the kernel tensor they describe (``of``), and an operator whose
kernel was replaced without them is bounded from its kernel alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["ChannelFactors"]


def _eye_like(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


@dataclass(frozen=True, eq=False)
class ChannelFactors:
    """``weight[:, :, y, x] = identity [(y, x) = centre] I + left @ core[:, :, y, x] @ right``.

    Attributes:
        of: the kernel these factors describe (they are ignored for any other tensor).
        core: (r_out, r_in, kh, kw), the kernel between the factors.
        left: (out, r_out), or None for the identity.
        right: (r_in, in), or None for the identity.
        identity: the coefficient of the identity tap (0 for none; then ``centre`` is unused).
        centre: the tap that holds the identity.
    """

    of: torch.Tensor
    core: torch.Tensor
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    identity: float = 0.0
    centre: tuple[int, int] = (0, 0)

    # -- keeping the factors through the compiler's folds -----------------------------------
    def then_mix(self, matrix: torch.Tensor, weight: torch.Tensor) -> "ChannelFactors | None":
        """The factors of ``matrix @ W_t`` (a pointwise conv after this one), ``weight`` its kernel."""
        if self.identity:
            return None
        left = matrix if self.left is None else matrix @ self.left.to(matrix)
        return replace(self, of=weight, left=left)

    def after_mix(self, matrix: torch.Tensor, weight: torch.Tensor) -> "ChannelFactors | None":
        """The factors of ``W_t @ matrix`` (this conv after a pointwise one)."""
        if self.identity:
            return None
        right = matrix if self.right is None else self.right.to(matrix) @ matrix
        return replace(self, of=weight, right=right)

    def scaled(self, vector: torch.Tensor, weight: torch.Tensor, side: str) -> "ChannelFactors | None":
        """The factors of the kernel with its output (``side="out"``) or input channels scaled (with an
        identity tap, only by one number: a per-channel scale of the identity is not ``a I``)."""
        v = vector.to(self.core)
        identity = 0.0
        if self.identity:
            if not bool((v == v.reshape(-1)[0]).all()):
                return None
            identity = self.identity * float(v.reshape(-1)[0])
        if side == "out":
            if self.left is None:
                return replace(self, of=weight, core=self.core * v.reshape(-1, 1, 1, 1), identity=identity)
            return replace(self, of=weight, left=self.left * v[:, None], identity=identity)
        if self.right is None:
            return replace(self, of=weight, core=self.core * v.reshape(1, -1, 1, 1), identity=identity)
        return replace(self, of=weight, right=self.right * v[None, :], identity=identity)

    def narrowed(self, weight: torch.Tensor, axis: int, first: int, length: int) -> "ChannelFactors | None":
        """The factors of the kernel cut to taps ``first .. first + length - 1`` along a spatial axis."""
        centre = list(self.centre)
        centre[axis] -= first
        if self.identity and not 0 <= centre[axis] < length:
            return None
        return replace(self, of=weight, core=self.core.narrow(2 + axis, first, length), centre=tuple(centre))

    def placed(self, weight: torch.Tensor, offset: tuple[int, int]) -> "ChannelFactors":
        """The factors of this kernel placed at ``offset`` in the larger kernel ``weight``."""
        kh, kw = weight.shape[-2:]
        (oh, ow), (ch, cw) = offset, self.core.shape[-2:]
        core = F.pad(self.core, (ow, kw - ow - cw, oh, kh - oh - ch))
        return replace(self, of=weight, core=core, centre=(self.centre[0] + oh, self.centre[1] + ow))

    def plus_identity(self, weight: torch.Tensor, coefficient: float,
                      centre: tuple[int, int]) -> "ChannelFactors | None":
        """The factors of ``coefficient [t = centre] I + W_t`` (an identity shortcut joined)."""
        if self.identity:
            return None
        return replace(self, of=weight, identity=float(coefficient), centre=tuple(centre))

    @classmethod
    def stacked(cls, weight: torch.Tensor,
                parts: list[tuple["ChannelFactors", tuple[int, int]]]) -> "ChannelFactors | None":
        """The factors of a sum of convs of one input, each placed at its offset in ``weight``:
        ``sum_j L_j (B_j R_j)_t = [L_1 ... L_n] [(B_1 R_1)_t; ...; (B_n R_n)_t]`` (a downsampling
        block: its projection shortcut and its bottleneck branch), or None when that is no narrower
        than the kernel or a part has an identity tap or no left factor."""
        if any(f.identity or f.left is None for f, _ in parts):
            return None
        if sum(f.left.shape[1] for f, _ in parts) >= weight.shape[0]:
            return None
        cores = []
        for f, offset in parts:
            core = f.placed(weight, offset).core
            cores.append(core if f.right is None else torch.einsum("abyx,bi->aiyx", core, f.right.to(core)))
        dtype = weight.dtype
        return cls(of=weight, core=torch.cat([c.to(dtype) for c in cores]),
                   left=torch.cat([f.left.to(dtype) for f, _ in parts], 1))

    @classmethod
    def of_pointwise(cls, weight: torch.Tensor) -> "ChannelFactors":
        """A 1x1 kernel as ``W_0 @ I``: a projection shortcut's part in a stacked sum."""
        c = weight.shape[1]
        return cls(of=weight, core=_eye_like(c, weight).reshape(c, c, 1, 1), left=weight[:, :, 0, 0])

    def to(self, weight: torch.Tensor) -> "ChannelFactors":
        """The factors in ``weight``'s dtype, describing ``weight``."""
        cast = lambda t: None if t is None else t.to(weight.dtype)  # noqa: E731
        return replace(self, of=weight, core=cast(self.core), left=cast(self.left), right=cast(self.right))

    # -- the reduction ----------------------------------------------------------------------
    def reduced(self, square_geometry: bool) -> tuple[torch.Tensor, float] | None:
        """A kernel with the same operator norm on the same geometry, and a floor ``f`` such that
        the norm is ``max(f, ||reduced||)`` (see the module docstring), in float64; None when it
        would be no smaller than the kernel itself, or when an identity tap needs a geometry that
        is not ``square_geometry`` (stride 1, no dilation)."""
        out_channels, in_channels = self.of.shape[:2]
        core = self.core.detach().to(torch.float64)
        left = None if self.left is None else self.left.detach().to(torch.float64)
        right = None if self.right is None else self.right.detach().to(torch.float64)
        if self.identity:
            if not square_geometry or out_channels != in_channels:
                return None
            c = out_channels
            spans = [m for m in (left, None if right is None else right.T) if m is not None]
            width = sum(m.shape[1] for m in spans) if len(spans) == 2 else c
            if width >= c:
                return None
            q, _ = torch.linalg.qr(torch.cat(spans, 1))  # c x k, orthonormal, span(L) + span(R^T)
            kernel = torch.einsum("ka,abyx,bl->klyx", q.T @ left, core, right @ q)
            kernel[:, :, self.centre[0], self.centre[1]] += self.identity * _eye_like(q.shape[1], q)
            return kernel, abs(self.identity)
        kernel = core
        if left is not None and left.shape[1] < left.shape[0]:
            kernel = torch.einsum("oa,abyx->obyx", torch.linalg.qr(left)[1], kernel)
        elif left is not None:
            kernel = torch.einsum("oa,abyx->obyx", left, kernel)
        if right is not None and right.shape[0] < right.shape[1]:
            kernel = torch.einsum("abyx,ib->aiyx", kernel, torch.linalg.qr(right.T)[1])
        elif right is not None:
            kernel = torch.einsum("abyx,bi->aiyx", kernel, right)
        if kernel.shape[0] * kernel.shape[1] >= out_channels * in_channels:
            return None
        return kernel, 0.0
