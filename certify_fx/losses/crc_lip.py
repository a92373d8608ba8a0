"""CRC-Lip training (Singla & Feizi, 2022, equation (7)): adversarial training of the softplus MLP
head on its own input, plus a penalty on the head's curvature bound."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.softplus_mlp import SOFTPLUS_CURVATURE, SoftplusMLP

__all__ = ["crc_lip", "curvature_penalty"]


def curvature_penalty(head: SoftplusMLP) -> torch.Tensor:
    """A differentiable bound on the curvature of every margin of ``head``, largest over pairs:
    ``max_{i,j} sum_k |w2_ik - w2_jk| ||w1_k||^2 / 4`` (>= the exact ``margin_curvature``)."""
    w2 = head.fc2.weight
    row_norms = head.fc1.weight.square().sum(dim=1)  # ||w1_k||^2
    differences = (w2[:, None, :] - w2[None, :, :]).abs()
    return SOFTPLUS_CURVATURE * (differences * row_norms).sum(dim=-1).amax()


def _attack(head: SoftplusMLP, features: torch.Tensor, labels: torch.Tensor, radius: float,
            steps: int) -> torch.Tensor:
    """l2 PGD on the head's input: a perturbation of norm <= ``radius`` raising the loss."""
    delta = torch.zeros_like(features, requires_grad=True)
    step = 2.5 * radius / max(steps, 1)
    for _ in range(steps):
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(head(features + delta), labels), delta)
        with torch.no_grad():
            delta += step * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            delta *= (radius / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp_max(1.0)
    return delta.detach()


def crc_lip(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor | None, eps: float, *,
            features: torch.Tensor, head: SoftplusMLP, gamma: float = 0.5, steps: int = 5) -> torch.Tensor:
    """``CE(h(g(x) + delta*), y) + gamma K_h`` with ``delta*`` found by ``steps`` of PGD in the
    ball of radius ``eps`` (the paper's rho) around the features ``g(x)``.

    The attack is not differentiated: gradients reach the body through ``g(x) + delta*`` as an
    identity (the paper's choice). ``logits`` and ``margin`` are unused: the loss needs the head
    and its input, which the trainer passes as ``features`` and ``head``.
    """
    delta = _attack(head, features.detach(), labels, eps, steps) if eps > 0 and steps > 0 else 0.0
    return F.cross_entropy(head(features + delta), labels) + gamma * curvature_penalty(head)
