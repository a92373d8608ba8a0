"""The CRC-Lip classifier (Singla & Feizi, 2022, Section 5): a 1-hidden-layer softplus MLP.

Its second derivative is bounded, which is what the curvature-based certificate
(:mod:`certify_fx.certificates.crc`) needs: for the margin ``z = h_i - h_j``,

    grad^2 z(y) = W1^T diag((w2_i - w2_j) * s''(W1 y + b1)) W1,   s'' in (0, 1/4],

so ``W1^T diag(min(v, 0) / 4) W1 <= grad^2 z <= W1^T diag(max(v, 0) / 4) W1`` for ``v = w2_i - w2_j``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmoothSoftplus", "SoftplusMLP"]

#: The largest second derivative of ``log(1 + exp(t))``: ``sigmoid(t) (1 - sigmoid(t)) <= 1/4``.
SOFTPLUS_CURVATURE = 0.25


class SmoothSoftplus(nn.Module):
    """``log(1 + exp(x))``, smooth everywhere (1-Lipschitz, curvature at most 1/4).

    Not ``nn.Softplus``: torch switches that to the identity above ``threshold``, a jump of about
    2e-9 that no curvature bound covers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


class SoftplusMLP(nn.Module):
    """``fc2(softplus(fc1(x)))``: the head CRC-Lip certifies.

    Args:
        in_features: features it reads (the 1-Lipschitz body's output).
        num_classes: logits it returns.
        hidden_features: width of the hidden layer (``in_features`` if omitted).
    """

    def __init__(self, in_features: int, num_classes: int, hidden_features: int | None = None) -> None:
        super().__init__()
        hidden = hidden_features or in_features
        self.in_features, self.out_features = in_features, num_classes
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = SmoothSoftplus()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
