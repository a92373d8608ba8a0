"""Knowledge distillation (Hinton et al., 2015): the student's softened prediction pulled towards a teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation"]


def distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(logits / T))``, averaged over the batch.

    The ``T^2`` keeps the gradient's scale independent of the temperature. The teacher's logits
    carry no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    target = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    student = F.log_softmax(logits / temperature, dim=1)
    return F.kl_div(student, target, reduction="batchmean", log_target=True) * temperature**2
