"""Spatial-MLP token mixing (ResMLP): a learned tokens x tokens linear map shared over channels."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TokenMixing"]


class TokenMixing(nn.Module):
    """``y[:, t, c] = sum_s weight[t, s] x[:, s, c] + bias[t]`` for (batch, tokens, channels) inputs.

    The globally Lipschitz replacement for self-attention: its constant is ``||weight||_2``
    exactly. Initialised to the identity (each token keeps itself).
    """

    def __init__(self, num_tokens: int, bias: bool = True) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.weight = nn.Parameter(torch.eye(num_tokens))
        self.bias = nn.Parameter(torch.zeros(num_tokens)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(self.weight, x)
        return y + self.bias[:, None] if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, bias={self.bias is not None}"
