"""Logit annealing (Lai et al., ICML 2025, "Block reflector orthogonal layers and logit annealing loss")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .emma import emma_logits


def logit_annealing(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float,
                    gamma: float = 5.0, offset: float = 2.0, temperature: float = 0.75,
                    min_fraction: float = 0.01) -> torch.Tensor:
    """``T (1 - p_t)^gamma CE(z / T, y)`` on EMMA's margin-adjusted logits ``z``, with ``offset``
    taken from the label's logit first and ``p_t = exp(-CE)``.

    The factor ``(1 - p_t)^gamma`` anneals the loss of samples already certified far from the
    boundary, so that training capacity goes to the ones near it (the offset keeps pushing every
    sample some way past it); the temperature sharpens the softmax. Defaults are the authors'.

    Args:
        gamma: the annealing exponent (0 gives EMMA with an offset and a temperature).
        offset: subtracted from the label's adjusted logit before the softmax.
        temperature: the softmax temperature ``T``.
        min_fraction: EMMA's per-class radius is clipped to ``[min_fraction * eps, eps]`` (0.01 as
            in the authors' code).
    """
    if gamma < 0 or temperature <= 0:
        raise ValueError(f"logit annealing needs gamma >= 0 and temperature > 0, got gamma={gamma}, "
                         f"temperature={temperature}")
    z = emma_logits(logits, labels, margin, eps, min_fraction)
    z = z - offset * F.one_hot(labels, z.shape[1]).to(z)
    ce = F.cross_entropy(z / temperature, labels, reduction="none")
    p_t = torch.exp(-ce)
    return ((1 - p_t) ** gamma * ce).mean() * temperature
