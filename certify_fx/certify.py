"""Certification: certified radii, verified robust accuracy, and the GloRo network wrapper.

A prediction ``j`` at ``x`` is robust at radius ``eps`` iff ``f_j(x) - f_i(x) > eps * K[j, i]``
for every ``i != j`` (Leino et al., 2021), so the certified radius is
``min_{i != j} (f_j - f_i) / K[j, i]``. The predicted class is the argmax *index*: tied logits
give a zero margin and never certify, and a zero constant with a zero margin (0/0) is radius 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .bounds.compiler import BoundCompiler, LipschitzBound
from .tracing import configured_input_shape

__all__ = ["Certificate", "GloRo", "bottom_logit", "certified_radius", "certify", "verified_robust_accuracy"]


@dataclass
class Certificate:
    """Certified predictions of a batch.

    Attributes:
        pred: (N,) predicted classes (argmax index).
        radius: (N,) certified l2 radius; 0 where the prediction is not robust at any radius.
        eps: the radius certification was asked for.
        sound: True if the radii rest on a proven bound (False when certified with estimates).
    """

    pred: torch.Tensor
    radius: torch.Tensor
    eps: float
    sound: bool = True

    @property
    def certified(self) -> torch.Tensor:
        """(N,) bool: robust at ``eps`` (``radius > eps``)."""
        return self.radius > self.eps

    def at(self, eps: float) -> torch.Tensor:
        """(N,) bool: robust at another radius, without recomputation."""
        return self.radius > eps

    def accuracy(self, labels: torch.Tensor) -> float:
        return (self.pred == labels.to(self.pred.device)).float().mean().item()

    def verified_robust_accuracy(self, labels: torch.Tensor, eps: float | None = None) -> float:
        """Fraction of points both correct and certified at ``eps`` (default: ``self.eps``)."""
        robust = self.at(self.eps if eps is None else eps)
        return ((self.pred == labels.to(self.pred.device)) & robust).float().mean().item()


def certified_radius(logits: torch.Tensor, margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and certified radii from logits (N, m) and margin constants K (m, m)."""
    pred = logits.argmax(dim=1)
    gap = logits.gather(1, pred[:, None]) - logits  # (N, m), >= 0
    k = margin.to(logits)[pred]  # (N, m): K[j, i]
    ratio = torch.where(k > 0, gap / k.clamp_min(torch.finfo(k.dtype).tiny),
                        torch.where(gap > 0, torch.inf, 0.0))
    ratio = ratio.scatter(1, pred[:, None], torch.inf)  # exclude i == j by index, never by value
    radius = ratio.amin(dim=1) if logits.shape[1] > 1 else torch.full_like(pred, torch.inf, dtype=logits.dtype)
    return pred, torch.nan_to_num(radius, nan=0.0, posinf=torch.inf)


def _input_shape(model: nn.Module, x: torch.Tensor | None) -> tuple[int, ...]:
    if x is not None:
        return tuple(x.shape[1:])
    shape = configured_input_shape(model)
    if shape is not None:
        return shape
    raise ValueError("pass input_shape (one input's shape without batch, e.g. (3, 32, 32))")


def certify(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    bound: LipschitzBound | None = None,
    *,
    use_estimate: bool = False,
) -> Certificate:
    """Certify a batch at l2 radius ``eps``.

    Args:
        model: the classifier (the same one ``bound`` was computed for).
        x: inputs (N, *input_shape).
        eps: the radius to certify.
        bound: a precomputed :func:`certify_fx.bound`; computed once here if omitted. Reuse it
            across batches: certification then costs one forward pass.
        use_estimate: certify with the power-iteration estimate instead of the proven bound (for
            reproducing papers; the certificate is then marked ``sound=False``).

    Raises:
        ValueError: the bound is not proven (``bound.sound`` False) and ``use_estimate`` is False.
    """
    if bound is None:
        bound = BoundCompiler(model, tuple(x.shape[1:])).sound_bound(estimate_steps=100 if use_estimate else 0)
    if not use_estimate and not bound.sound:
        raise ValueError("the Lipschitz bound is not proven for every factor (bound.sound is False); "
                         "refusing to certify. Pass use_estimate=True to certify with estimates")
    margin = bound.estimate if use_estimate else bound.margin
    with torch.inference_mode():
        logits = model(x)
    pred, radius = certified_radius(logits, margin)
    return Certificate(pred, radius, float(eps), sound=not use_estimate)


def verified_robust_accuracy(
    model: nn.Module,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float | Iterable[float],
    bound: LipschitzBound | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float | dict[float, float]]:
    """Clean accuracy and VRA at each ``eps`` over batches of ``(x, y)``.

    Returns ``{"clean_accuracy": a, "vra": {eps: v, ...}}``.
    """
    eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    correct, total, robust = 0, 0, {e: 0 for e in eps_list}
    for x, y in data:
        if device is not None:
            x, y = x.to(device), y.to(device)
        if bound is None:
            bound = BoundCompiler(model, tuple(x.shape[1:])).sound_bound(estimate_steps=0)
        cert = certify(model, x, eps_list[0], bound)
        hit = cert.pred == y
        correct += int(hit.sum())
        total += len(y)
        for e in eps_list:
            robust[e] += int((hit & cert.at(e)).sum())
    total = max(total, 1)
    return {"clean_accuracy": correct / total, "vra": {e: r / total for e, r in robust.items()}}


class GloRo(nn.Module):
    """A globally-robust network: the model's m logits plus a bottom logit ``f_bot`` (last).

    ``f_bot(x) = max_{i != j} f_i(x) + eps * K[j, i]`` with ``j`` the predicted class; the GloRo net
    predicts ``j`` only where ``f_j > f_bot``, i.e. where ``j`` is certified at ``eps``.

    In training mode ``K`` is the differentiable power-iteration estimate (``power_steps``
    iterations per forward, iterates persisted); in eval mode it is the proven bound, recomputed
    only when the weights change.

    Args:
        model: the classifier.
        eps: the certification radius.
        input_shape: one input's shape (without batch); taken from a timm model's config if
            omitted, else from the first batch.
        power_steps: power-iteration steps per training forward.
    """

    def __init__(self, model: nn.Module, eps: float, input_shape: tuple[int, ...] | None = None,
                 power_steps: int = 1) -> None:
        super().__init__()
        self.model, self.eps, self.power_steps = model, float(eps), power_steps
        self._compiler: BoundCompiler | None = None
        self._cached: tuple[tuple, LipschitzBound] | None = None
        try:
            shape = _input_shape(model, None) if input_shape is None else tuple(input_shape)
        except ValueError:
            shape = None
        if shape is not None:
            self._compile(shape)

    def _compile(self, shape: tuple[int, ...]) -> BoundCompiler:
        self._compiler = BoundCompiler(self.model, shape)
        return self._compiler

    def _fingerprint(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in (*self.model.parameters(), *self.model.buffers()))

    def lipschitz_bound(self) -> LipschitzBound:
        """The proven bound for the current weights (cached until they change)."""
        if self._compiler is None:
            raise RuntimeError("run one forward pass or pass input_shape first")
        key = self._fingerprint()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._compiler.sound_bound(estimate_steps=0))
        return self._cached[1]

    def margin(self) -> torch.Tensor:
        """(m, m) margin constants: differentiable estimate in training, proven bound in eval."""
        if self.training:
            return self._compiler.estimate(steps=self.power_steps)
        return self.lipschitz_bound().margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiler is None:
            self._compile(tuple(x.shape[1:]))
        logits = self.model(x)
        return torch.cat([logits, bottom_logit(logits, self.margin(), self.eps)[:, None]], dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes, with ``m`` (the bottom class) where the prediction is not certified."""
        out = self.forward(x)
        m = out.shape[1] - 1
        pred = out[:, :m].argmax(dim=1)
        robust = out.gather(1, pred[:, None])[:, 0] > out[:, m]
        return torch.where(robust, pred, torch.full_like(pred, m))

    def extra_repr(self) -> str:
        return f"eps={self.eps}, power_steps={self.power_steps}"


def bottom_logit(logits: torch.Tensor, margin: torch.Tensor, eps: float) -> torch.Tensor:
    """``max_{i != j} f_i + eps * K[j, i]`` with ``j = argmax f`` (masked by index)."""
    pred = logits.argmax(dim=1)
    shifted = logits + eps * margin.to(logits)[pred]
    shifted = shifted.scatter(1, pred[:, None], -torch.inf)
    return shifted.amax(dim=1)
