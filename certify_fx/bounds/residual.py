"""Gated residual layers that are 1-Lipschitz by their algebra (SLL, CPL), proven on their weights.

A layer ``y = A u + B sigma(C u + b)`` with ``sigma`` elementwise, nondecreasing and with slopes in
``[0, 1]`` (ReLU, tanh, ...) is bounded generically by ``||A|| + ||B|| ||C||``. For the
residual layers of SDP-based Lipschitz networks that is about 2, where the layer is 1-Lipschitz
by construction:

* SLL (Araujo et al. 2023): ``u - 2 W T^-1 sigma(W^T u + b)`` with ``T`` diagonal and
  ``T_ii >= sum_j |W^T W|_ij q_j / q_i``;
* CPL (Meunier et al. 2022): ``u - (2 / ||W||^2) W sigma(W^T u + b)``.

Both have ``A = I`` and ``B = -C^T S`` with ``S`` diagonal and nonnegative. **Claim**: for
``A = I + E`` and any diagonal ``S >= 0``, with ``R = B + C^T S`` and
``lambda = lambda_max(C^T S C)``, the layer's Lipschitz constant is at most
``max(1, lambda - 1) + ||R|| ||C|| + ||E||``.

*Proof.* For two inputs, ``sigma(z) - sigma(z') = D (z - z')`` with ``D`` diagonal and
``0 <= D <= I`` (the difference quotient of each element lies in ``[0, 1]``), so
``y - y' = (A + B D C)(u - u') = (I - C^T S D C + R D C + E)(u - u')``. Since ``S D`` is diagonal
with ``0 <= S D <= S``, ``0 <= C^T S D C <= C^T S C <= lambda I``: the symmetric matrix
``I - C^T S D C`` has its eigenvalues in ``[1 - lambda, 1]`` and norm ``<= max(1, lambda - 1)``;
``||R D C|| <= ||R|| ||C||`` and ``||E||`` add by the triangle inequality. QED. For SLL and CPL,
``R = E = 0`` and ``lambda <= 2`` (SLL's condition on ``T`` is ``W^T W <= T`` by diagonal
dominance; CPL's ``2 W W^T / ||W||^2 <= 2 I``), so the constant is 1.

:func:`gated_residual_bound` fits ``S`` to the actual ``B`` and ``C`` (the least-squares
diagonal, clipped at 0) and computes every term in float64 with a relative rounding margin; the
compiler uses it only where it recognises the structure (``R`` and ``E`` vanish up to rounding)
and where it is below the generic bound.
"""

from __future__ import annotations

import torch

from .norms import SAFETY, dense_norm_bound

__all__ = ["gated_residual_bound", "STRUCTURE_TOLERANCE"]

#: ``||R|| ||C|| + ||E||`` at most this: the layer has the gated residual structure
STRUCTURE_TOLERANCE = 1e-6


def _norm(matrix: torch.Tensor) -> float:
    return dense_norm_bound(matrix).value  # exact in float64, rounded up


def gated_residual_bound(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[float, float] | None:
    """``(bound, structure residual)`` for ``u -> A u + B sigma(C u + b)`` (float64 matrices
    ``A``: n x n, ``B``: n x h, ``C``: h x n), or None if the shapes do not fit or a value is not finite.

    The bound holds for every such ``A, B, C`` (see the module docstring); the residual
    ``||R|| ||C|| + ||E||`` says how far the layer is from the SLL/CPL form.
    """
    n, h = b.shape
    if a.shape != (n, n) or c.shape != (h, n):
        return None
    if not all(bool(torch.isfinite(t).all()) for t in (a, b, c)):
        return None
    rows = (c * c).sum(1)
    # B[:, j] = -s_j C[j, :]^T: the least-squares s_j, clipped at 0 (any s >= 0 keeps the bound sound)
    s = torch.where(rows > 0, -(b.T * c).sum(1) / rows.clamp_min(torch.finfo(c.dtype).tiny), 0.0).clamp_min(0)
    r = b + c.T * s[None, :]
    e = a - torch.eye(n, dtype=a.dtype)
    scaled = c * s.sqrt()[:, None]
    lam = _norm(scaled) ** 2 * (1 + SAFETY)  # lambda_max(C^T S C) = ||S^(1/2) C||^2, rounded up
    residual = _norm(r) * _norm(c) + _norm(e)
    return max(1.0, lam - 1.0) * (1 + SAFETY) + residual, residual
