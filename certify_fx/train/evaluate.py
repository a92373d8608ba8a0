"""Certified evaluation of a dataset with the proven bound, sharded over processes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..bounds.result import LipschitzBound
from ..certify import certified_radius, certify, check_bound, check_input_shape
from ..crc import CurvatureBound
from .distributed import DistributedContext, all_reduce_sum

__all__ = ["CertifiedEvaluation", "evaluate_certified"]


@dataclass
class CertifiedEvaluation:
    """Clean accuracy, VRA per radius, and (on request) every correct point's certified radius."""

    clean_accuracy: float
    vra: dict[float, float]
    count: int
    radii: torch.Tensor | None = field(default=None, repr=False)  #: radius of each point, 0 if wrong

    def certified_accuracy(self, radius: float) -> float:
        """Fraction of points correct and certified at ``radius`` (needs ``radii``)."""
        if self.radii is None:
            raise ValueError("evaluate with keep_radii=True to query arbitrary radii")
        return (self.radii > radius).float().mean().item()


@torch.no_grad()
def evaluate_certified(model: nn.Module, bound: LipschitzBound | CurvatureBound | None, dataset: Dataset,
                       eps: list[float], batch_size: int = 1000, ctx: DistributedContext | None = None,
                       keep_radii: bool = False, progress=None, crc_classes: int | None = None) -> CertifiedEvaluation:
    """Certify every point of ``dataset`` with ``bound.margin`` (refuses an unproven bound), or
    with CRC-Lip when ``bound`` is a :class:`~certify_fx.crc.CurvatureBound`.

    Each process takes every ``world_size``-th point; counts are summed over processes. Without a
    ``bound`` (a model that cannot be bounded, e.g. a plain ViT) nothing is certified: radii are 0
    and only the clean accuracy is measured. ``crc_classes``: see :func:`certify_fx.certify`.
    """
    curvature = bound if isinstance(bound, CurvatureBound) else None
    if curvature is not None:
        bound = curvature.lipschitz
    if bound is not None and not bound.sound:
        raise ValueError("the bound is not proven for every factor; refusing to report VRA")
    ctx = ctx or DistributedContext()
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(shard, batch_size=batch_size)
    was_training = model.training
    model.eval()
    if bound is not None:
        check_bound(model, bound, tuple(bound.input_shape))
    margin = bound.margin.to(ctx.device) if bound is not None else None
    correct = total = 0
    robust = [0] * len(eps)
    radii = []
    task = progress.add_task("certify", total=len(loader)) if progress is not None else None
    for x, y in loader:
        x, y = x.to(ctx.device), y.to(ctx.device)
        if bound is None:
            pred = model(x).argmax(1)
            radius = torch.zeros(len(y), dtype=torch.float64, device=ctx.device)
        elif curvature is not None:
            cert = certify(model, x, 0.0, curvature, method="crc", crc_classes=crc_classes)
            pred, radius = cert.pred, cert.radius
        else:
            check_input_shape(bound, tuple(x.shape[1:]))
            pred, radius = certified_radius(model(x), margin)
        hit = pred == y
        correct += int(hit.sum())
        total += len(y)
        for i, e in enumerate(eps):
            robust[i] += int((hit & (radius > e)).sum())
        if keep_radii:
            radii.append(torch.where(hit, radius, torch.zeros_like(radius)).cpu())
        if task is not None:
            progress.advance(task)
    model.train(was_training)
    correct, total, *robust = all_reduce_sum([correct, total, *robust], ctx)
    total = max(total, 1)
    return CertifiedEvaluation(correct / total, {e: r / total for e, r in zip(eps, robust)}, int(total),
                               torch.cat(radii) if radii else None)
