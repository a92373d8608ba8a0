"""Certify a whole dataset: the one loop behind :func:`certify_fx.verified_robust_accuracy`, the
trainer's evaluation, ``certify-fx certify`` and :func:`certify_fx.audit`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .base import Certificate, CertificateMethod, certificate_method
from .radius import check_eps, check_input_shape

if TYPE_CHECKING:
    from ..progress import ProgressLike

__all__ = ["BatchHook", "CertifiedEvaluation", "evaluate_certified"]

#: Called after each batch with ``(x, y, certificate, offset)`` (``offset``: how many points came
#: before this batch); what it returns, if anything, is shown beside the progress bar.
BatchHook = Callable[[torch.Tensor, torch.Tensor, Certificate, int], "str | None"]


@dataclass
class CertifiedEvaluation:
    """Clean accuracy, VRA per radius, and (on request) every correct point's certified radius."""

    clean_accuracy: float
    vra: dict[float, float]
    count: int
    radii: torch.Tensor | None = field(default=None, repr=False)  #: radius of each point, 0 if wrong
    bound: Any = field(default=None, repr=False)  #: the constants the method certified with

    def certified_accuracy(self, radius: float) -> float:
        """Fraction of points correct and certified at ``radius`` (needs ``radii``)."""
        if self.radii is None:
            raise ValueError("evaluate with keep_radii=True to query arbitrary radii")
        return (self.radii > radius).float().mean().item()


@torch.no_grad()
def evaluate_certified(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float | Sequence[float],
    method: str | CertificateMethod | None = "lipschitz",
    bound: Any = None,
    *,
    device: torch.device | str | None = None,
    keep_radii: bool = False,
    progress: ProgressLike | None = None,
    description: str = "certify",
    on_batch: BatchHook | None = None,
    reduce: Callable[[list[int]], list[int]] | None = None,
) -> CertifiedEvaluation:
    """Certify every batch ``(x, y)`` of ``batches`` with ``method`` and count, per radius, the
    points both correct and certified.

    Args:
        model: the classifier; it is used in the mode it is in (the bound records that mode).
        batches: ``(x, y)`` pairs, read once and lazily (a DataLoader, a shard of one, a list).
        eps: radii to report VRA at.
        method: a certificate method or its name (:data:`~certify_fx.certificates.CERTIFICATE_METHODS`);
            ``None`` certifies nothing (radii 0: clean accuracy only, for a model that cannot be bounded).
        bound: the method's constants (:meth:`CertificateMethod.prove`); proven from the first
            batch's shape if omitted, checked against the model once if given.
        device: move each batch there first.
        keep_radii: return every point's radius (0 where the prediction is wrong).
        progress: a progress display; ``description`` names the task.
        on_batch: a :data:`BatchHook`, e.g. the audit's attacks.
        reduce: sums counts over processes (``[correct, total, *robust] -> same, summed``) when the
            batches are one shard of a dataset.
    """
    eps_list = [check_eps(eps)] if isinstance(eps, (int, float)) else [check_eps(e) for e in eps]
    method = certificate_method(method) if method is not None else None
    checked = False
    correct = total = 0
    robust = [0] * len(eps_list)
    radii = []
    size = len(batches) if hasattr(batches, "__len__") else None  # a generator is read lazily
    task = progress.add_task(description, total=size, info="") if progress is not None else None
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        if method is None:
            cert = Certificate(model(x).argmax(1), torch.zeros(len(y), dtype=torch.float64, device=x.device),
                               eps_list[0] if eps_list else 0.0, sound=False)
        else:
            shape = tuple(x.shape[1:])
            if bound is None:
                bound = method.prove(model, shape, progress=progress)
            if not checked:  # the model does not change during the loop: its fingerprint is read once
                method.check(model, bound, shape)
                checked = True
            else:
                check_input_shape(method.margin_bound(bound), shape)
            cert = method.batch_certificate(model, x, eps_list[0] if eps_list else 0.0, bound)
        hit, label_radius = cert.correct(y), cert.label_radius(y)
        for i, e in enumerate(eps_list):
            robust[i] += int((label_radius > e).sum())
        if keep_radii:
            radii.append(label_radius.cpu())
        info = on_batch(x, y, cert, total) if on_batch is not None else None
        correct += int(hit.sum())
        total += len(y)
        if task is not None:
            progress.update(task, advance=1, info=info or "")
    if task is not None:
        progress.remove_task(task)
    if reduce is not None:
        correct, total, *robust = reduce([correct, total, *robust])
    count = max(total, 1)
    return CertifiedEvaluation(correct / count, {e: r / count for e, r in zip(eps_list, robust)}, int(total),
                               torch.cat(radii) if radii else None, bound)
