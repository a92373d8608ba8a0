"""EMMA: efficient margin maximisation (Hu et al., 2023, Def. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def emma(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float,
         min_fraction: float = 0.0) -> torch.Tensor:
    """``-log(e^{f_y} / sum_i e^{f_i + eps_i K[y, i]})`` with ``eps_i = clip(kappa_i, 0, eps)``.

    ``kappa_i = (f_y - f_i) / K[y, i]`` is the radius at which class ``i`` is currently certified
    against the label, and ``eps_i`` is a constant (no gradient): every non-label logit is pushed
    up by the margin it could gain within the current certified ball, never more than ``eps``.
    ``eps_i = 0`` for the label and for misclassified pairs, where EMMA is cross-entropy.

    Args:
        min_fraction: clip ``eps_i`` to ``[min_fraction * eps, eps]`` instead (the reference code
            uses 0.01; the paper 0).
    """
    return F.cross_entropy(emma_logits(logits, labels, margin, eps, min_fraction), labels)


def emma_logits(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float,
                min_fraction: float = 0.0) -> torch.Tensor:
    """EMMA's margin-adjusted logits ``f_i + eps_i K[y, i]`` (see :func:`emma`), which the logit
    annealing loss shares."""
    k = margin.to(logits)[labels]  # (N, m): K[y, i]
    with torch.no_grad():
        gap = logits.gather(1, labels[:, None]) - logits
        kappa = torch.where(k > 0, gap / k.clamp_min(torch.finfo(k.dtype).tiny), torch.zeros_like(gap))
        eps_i = kappa.clamp(min_fraction * eps, eps)
        eps_i = eps_i.scatter(1, labels[:, None], 0.0)  # the label itself, by index
    return logits + eps_i * k
