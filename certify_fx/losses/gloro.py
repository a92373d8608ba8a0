"""GloRo losses (Leino et al., 2021): cross-entropy and TRADES on the bottom-logit-augmented net."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..certify import bottom_logit


def gloro_logits(logits: torch.Tensor, margin: torch.Tensor, eps: float) -> torch.Tensor:
    """``[f, f_bot]`` (N, m + 1): the GloRo net's output, bottom logit last."""
    return torch.cat([logits, bottom_logit(logits, margin, eps)[:, None]], dim=1)


def gloro_ce(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float) -> torch.Tensor:
    """Cross-entropy of ``[f, f_bot]`` with the label (the bottom class is never the label)."""
    return F.cross_entropy(gloro_logits(logits, margin, eps), labels)


def trades(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float,
           lam: float = 1.0) -> torch.Tensor:
    """``CE(f, y) + lam * CE([f, f_bot], [softmax(f), 0])`` (GloRo Def. 3).

    The second term asks the GloRo net to agree with the clean prediction and to put no mass on
    the bottom class; ``lam`` trades clean accuracy for robustness (recipes may schedule it).
    """
    clean = F.cross_entropy(logits, labels)
    target = F.pad(logits.softmax(dim=1), (0, 1))  # the bottom class gets probability 0
    robust = -(target * gloro_logits(logits, margin, eps).log_softmax(dim=1)).sum(dim=1).mean()
    return clean + lam * robust
