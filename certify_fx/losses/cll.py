"""CLL: the calibrated Lipschitz-margin loss (Losch et al., 2024, Def. 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def calibrated_sigma(eps: float, p: float) -> float:
    """``sigma = 2 eps / (logit(1 - p) - logit(p))``: the logistic scale that puts probability ``p``
    at the margin edges ``-eps`` and ``1 - p`` at ``+eps``."""
    if not 0 < p < 0.5:
        raise ValueError(f"CLL slack p must be in (0, 0.5), got {p}")
    return 2 * eps / (math.log((1 - p) / p) - math.log(p / (1 - p)))


def cll(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float,
        p: float = 0.01, lam: float = 0.0, delta: float | None = None,
        detach_margin: bool = False) -> torch.Tensor:
    """``-log softmax(g)_y + lam * K_max^2``.

    ``g_i = delta / sigma + (f_i - f_y) / (sigma K[i, y])`` for ``i != y`` and ``g_y = -delta / sigma``,
    with ``sigma`` from :func:`calibrated_sigma` (``eps`` the margin width, ``p`` the slack).

    Args:
        p: slack, the probability at the margin edge (smaller: harder margins, larger K).
        lam: weight of the ``K_max^2`` penalty.
        delta: offset of the margin (defaults to ``eps``).
        detach_margin: treat ``K`` as a constant inside the cross-entropy term so that only the
            penalty pushes it down (the reference code does this; the paper does not).
    """
    sigma = calibrated_sigma(eps, p)
    delta = eps if delta is None else delta
    k = margin.to(logits)
    k_ce = k.detach() if detach_margin else k
    k_iy = k_ce.T[labels]  # (N, m): K[i, y]
    gap = logits - logits.gather(1, labels[:, None])  # f_i - f_y
    g = delta / sigma + gap / (sigma * k_iy.clamp_min(torch.finfo(k.dtype).tiny))
    g = g.scatter(1, labels[:, None], -delta / sigma)
    return F.cross_entropy(g, labels) + lam * k.max() ** 2
