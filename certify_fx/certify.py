"""Certification: certified radii, verified robust accuracy, and the GloRo network wrapper.

A prediction ``j`` at ``x`` is robust at radius ``eps`` iff ``f_j(x) - f_i(x) > eps * K[j, i]``
for every ``i != j`` (Leino et al., 2021), so the certified radius is
``min_{i != j} (f_j - f_i) / K[j, i]``. The predicted class is the argmax *index*: tied logits
give a zero margin and never certify, and a zero constant with a zero margin (0/0) is radius 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from .bounds.capture import configured_input_shape
from .bounds.compiler import BoundCompiler
from .bounds.compiler import bound as margin_bound
from .bounds.fingerprint import model_fingerprint
from .bounds.result import FULL_PRECISION, LipschitzBound
from .crc import CurvatureBound, crc_head, curvature_bound, curvature_radius
from .errors import CertifyFxError, StaleBoundError, UnprovenBoundError

if TYPE_CHECKING:
    from .progress import ProgressLike

__all__ = ["CERTIFICATE_METHODS", "Certificate", "GloRo", "bottom_logit", "certificate_bound", "certified_radius",
           "certify", "check_bound", "check_eps", "pair_radii", "round_up", "rounding_slack", "verified_robust_accuracy",
           "ROUNDING_SLACK_ULPS"]

#: Logits are computed in floating point: a gap of a few units in the last place of the logits is
#: treated as a tie, so rounding can never turn into a certified margin. The slack subtracted from
#: each gap ``f_j - f_i`` is ``ROUNDING_SLACK_ULPS * eps(dtype) * (|f_j| + |f_i|)``.
ROUNDING_SLACK_ULPS = 8


def check_eps(eps: float) -> float:
    """``eps`` as a float; raises unless it is a finite number >= 0."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise CertifyFxError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise CertifyFxError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def round_up(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast to ``dtype``, rounded up wherever the cast would round down (for upper bounds)."""
    cast = t.to(dtype)
    if cast.dtype == t.dtype:
        return cast
    below = cast.to(t.dtype) < t
    return torch.where(below, torch.nextafter(cast, torch.full_like(cast, math.inf)), cast)


def check_input_shape(bound: LipschitzBound, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`StaleBoundError` unless ``bound`` holds for inputs of ``input_shape``."""
    shape = tuple(input_shape)
    if tuple(bound.input_shape) != shape:
        raise StaleBoundError(f"the bound was computed for inputs of shape {tuple(bound.input_shape)}, not "
                              f"{shape}; compute it for this shape with certify_fx.bound(model, {shape})")


def check_bound(model: nn.Module, bound: LipschitzBound, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`StaleBoundError` unless ``bound`` was proven for ``model`` as it is now and for
    inputs of ``input_shape``."""
    check_input_shape(bound, input_shape)
    if bound.fingerprint is None:
        raise StaleBoundError("the bound does not record which model it was proven for; compute it with "
                              "certify_fx.bound(model, input_shape)")
    now, then = model_fingerprint(model), bound.fingerprint
    if now == then:
        return
    if now.structure != then.structure:
        what = "structure changed"
    elif now.weights != then.weights:
        what = "weights changed"
    else:
        raise StaleBoundError("a module of the model is in another mode (train/eval) than when the bound was "
                              "computed (the weights are the same); call model.eval() as before, or compute the "
                              "bound again with certify_fx.bound(model, input_shape)")
    raise StaleBoundError(f"the model's {what} since the bound was computed; compute it again with "
                          "certify_fx.bound(model, input_shape)")


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
        return self.radius > check_eps(eps)

    def accuracy(self, labels: torch.Tensor) -> float:
        return (self.pred == labels.to(self.pred.device)).float().mean().item()

    def verified_robust_accuracy(self, labels: torch.Tensor, eps: float | None = None) -> float:
        """Fraction of points both correct and certified at ``eps`` (default: ``self.eps``)."""
        robust = self.at(self.eps if eps is None else eps)
        return ((self.pred == labels.to(self.pred.device)) & robust).float().mean().item()


def certified_radius(logits: torch.Tensor, margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and certified radii (float64) from logits (N, m) and margin constants K (m, m).

    Everything is compared in float64 with a rounding slack (:data:`ROUNDING_SLACK_ULPS`). Fails
    closed: a row of logits with a NaN/inf, or a NaN/inf anywhere in ``K``, gets radius 0; ties and
    0/0 get radius 0. Half and bfloat16 logits are refused: their rounding is not covered.
    """
    pred, pairs = pair_radii(logits, margin)
    return pred, _smallest(pairs)


def _smallest(pairs: torch.Tensor) -> torch.Tensor:
    """The radius of each row of :func:`pair_radii` (0 for a row that cannot be certified)."""
    return torch.where(pairs.isnan().any(dim=1), 0.0, pairs.amin(dim=1))  # one class: its own column, inf


def rounding_slack(logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(N, m) float64: how far rounding may move each gap ``f_pred - f_i`` of ``logits`` (see
    :data:`ROUNDING_SLACK_ULPS`); every certificate treats a gap within it as a tie."""
    values = logits.detach().to(torch.float64)
    top = values.gather(1, pred[:, None])
    return ROUNDING_SLACK_ULPS * torch.finfo(logits.dtype).eps * (top.abs() + values.abs())


def pair_radii(logits: torch.Tensor, margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and, per class ``i``, the radius within which ``f_pred - f_i`` stays positive:
    (N, m) float64, ``inf`` at the predicted class, 0 where the gap (less the rounding slack) is
    not positive, NaN in every entry of a row that cannot be certified (NaN/inf logits or ``K``)."""
    if logits.dtype not in FULL_PRECISION:
        raise CertifyFxError(f"logits are {logits.dtype}; certificates need float32 or float64 logits (half/bfloat16 "
                             "rounding can flip a certified prediction). Certify model.float() instead")
    pred = logits.argmax(dim=1)
    values = logits.detach().to(torch.float64)
    k = margin.detach().to(device=values.device, dtype=torch.float64)
    top = values.gather(1, pred[:, None])
    gap = top - values - rounding_slack(logits, pred)  # (N, m)
    k_pred = k[pred]  # (N, m): K[j, i]
    ratio = torch.where(k_pred > 0, gap / k_pred.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.where(gap > 0, torch.inf, 0.0)).clamp_min(0.0)
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=torch.inf)
    ratio = ratio.scatter(1, pred[:, None], torch.inf)  # exclude i == j by index, never by value
    finite = torch.isfinite(values).all(dim=1) & bool(torch.isfinite(k).all())
    return pred, torch.where(finite[:, None], ratio, torch.nan)


def certify(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    bound: LipschitzBound | CurvatureBound | None = None,
    *,
    use_estimate: bool = False,
    method: str = "lipschitz",
    crc_classes: int | None = None,
) -> Certificate:
    """Certify a batch at l2 radius ``eps``.

    Args:
        model: the classifier (the same one ``bound`` was computed for).
        x: inputs (N, *input_shape).
        eps: the radius to certify.
        bound: a precomputed :func:`certify_fx.bound` (or, for ``method="crc"``,
            :func:`certify_fx.curvature_bound`); computed here if omitted. Reuse it across batches:
            certification then costs one forward pass (plus the convex solves of ``"crc"``).
        use_estimate: certify with the power-iteration estimate instead of the proven bound (for
            reproducing papers; the certificate is then marked ``sound=False``).
        method: ``"lipschitz"`` (margins over the Lipschitz constants ``K``) or ``"crc"``
            (CRC-Lip, :mod:`certify_fx.crc`: for a model whose classifier is a
            :class:`~certify_fx.nn.SoftplusMLP`; each class keeps the larger of its two proven radii).
        crc_classes: with ``"crc"``, solve for the ``crc_classes`` classes nearest by the Lipschitz
            radius only (the others keep their Lipschitz radius; sound either way). All if None.

    Raises:
        ValueError: the bound is not proven (``bound.sound`` False) and ``use_estimate`` is False.
        StaleBoundError: ``bound`` was computed for another input shape, other weights or another
            structure than ``model`` has now.
        CertifyFxError: ``eps`` is not a finite number >= 0, the logits are half/bfloat16, an
            unknown ``method``, or ``"crc"`` for a model without a softplus MLP classifier.
    """
    eps = check_eps(eps)
    input_shape = tuple(x.shape[1:])
    _check_method(method)
    if method == "crc":
        return _certify_crc(model, x, eps, bound, crc_classes, use_estimate)
    if isinstance(bound, CurvatureBound):
        bound = bound.lipschitz
    if bound is None:
        bound = BoundCompiler(model, input_shape).sound_bound(estimate_steps=100 if use_estimate else 0)
    else:
        check_bound(model, bound, input_shape)
    _check_proven(bound.sound, bound.finite, use_estimate)
    margin = bound.estimate if use_estimate else bound.margin
    with torch.inference_mode():
        logits = model(x)
    _check_logits(logits, x, bound.num_classes)
    pred, radius = certified_radius(logits, margin)
    return Certificate(pred, radius, float(eps), sound=not use_estimate)


#: The certificate kinds :func:`certify` computes.
CERTIFICATE_METHODS = ("lipschitz", "crc")


def _check_method(method: str) -> None:
    if method not in CERTIFICATE_METHODS:
        raise CertifyFxError(f"unknown certificate method {method!r}; choose one of {', '.join(CERTIFICATE_METHODS)}")


def certificate_bound(model: nn.Module, input_shape: tuple[int, ...], method: str = "lipschitz",
                      progress: ProgressLike | None = None) -> LipschitzBound | CurvatureBound:
    """The proven constants a certificate of ``method`` rests on, computed once for many batches of
    :func:`certify`: :func:`certify_fx.bound` for ``"lipschitz"``, :func:`certify_fx.curvature_bound`
    (which holds that bound too) for ``"crc"``."""
    _check_method(method)
    if method == "crc":
        return curvature_bound(model, input_shape, progress=progress)
    return margin_bound(model, input_shape, estimate_steps=0, progress=progress)


def _check_proven(sound: bool, finite: bool, use_estimate: bool) -> None:
    if not use_estimate and not sound:
        reason = "it is not finite (NaN/inf weights?)" if not finite else "not every factor is proven"
        raise UnprovenBoundError(f"the Lipschitz bound is not proven ({reason}; bound.sound is False); refusing "
                                 "to certify. Pass use_estimate=True to certify with estimates")


def _check_logits(logits: object, x: torch.Tensor, num_classes: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.shape != (x.shape[0], num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise StaleBoundError(f"the model returned logits of shape {shape} for {x.shape[0]} inputs; the bound is for "
                              f"(batch, {num_classes}) logits")


def _certify_crc(model: nn.Module, x: torch.Tensor, eps: float, bound: LipschitzBound | CurvatureBound | None,
                 classes: int | None, use_estimate: bool) -> Certificate:
    if use_estimate:
        raise CertifyFxError("method='crc' certifies with proven constants only; use_estimate applies to 'lipschitz'")
    input_shape = tuple(x.shape[1:])
    head = crc_head(model)
    if isinstance(bound, CurvatureBound):
        check_bound(model, bound.lipschitz, input_shape)
    else:  # a given margin bound is checked before the curvature constants are built on it
        if bound is not None:
            check_bound(model, bound, input_shape)
        bound = curvature_bound(model, input_shape, lipschitz=bound)
    _check_proven(bound.sound, bound.lipschitz.finite, False)
    with torch.inference_mode():
        features = model.forward_features(x)
        logits = model.forward_head(features)  # timm's contract: model(x) == forward_head(forward_features(x))
    _check_logits(logits, x, bound.lipschitz.num_classes)
    pred, pairs = pair_radii(logits, bound.lipschitz.margin)
    m = pairs.shape[1]
    if m > 1:
        k = m - 1 if classes is None else max(1, min(int(classes), m - 1))
        nearest = pairs.nan_to_num(nan=0.0).topk(k, dim=1, largest=False).indices  # pred (inf) is never chosen
        # the same rounding slack as the Lipschitz radius: the boundary proven is z = slack, not z = 0
        slack = rounding_slack(logits, pred).gather(1, nearest)
        curved = curvature_radius(head, features.flatten(1), pred, bound.lower, bound.upper, nearest, slack=slack)
        curved = torch.where(pairs.gather(1, nearest) > 0, curved / bound.features, 0.0)  # the gap must be positive
        pairs = pairs.scatter(1, nearest, torch.maximum(pairs.gather(1, nearest), curved))
    return Certificate(pred, _smallest(pairs), float(eps))


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
    eps_list = [check_eps(eps)] if isinstance(eps, (int, float)) else [check_eps(e) for e in eps]
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
    whenever the weights change (any write, ``.data`` included). A changed structure (a replaced
    submodule, a hook) is traced again; :meth:`predict` always certifies with the proven bound.

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
        self.model, self.eps, self.power_steps = model, check_eps(eps), power_steps
        self._compiler: BoundCompiler | None = None
        self._cached: tuple[object, LipschitzBound] | None = None
        shape = tuple(input_shape) if input_shape is not None else configured_input_shape(model)
        if shape is not None:
            self._compile(shape)

    def _compile(self, shape: tuple[int, ...]) -> BoundCompiler:
        self._compiler = BoundCompiler(self.model, shape)
        self._cached = None
        return self._compiler

    @property
    def compiler(self) -> BoundCompiler:
        """The bound compiler for the model's current structure (its iterates are in ``state_dict``)."""
        return self._compiler_for(model_fingerprint(self.model, weights=False).structure)

    def _compiler_for(self, structure: int) -> BoundCompiler:
        if self._compiler is None:
            raise CertifyFxError("GloRo has no input shape yet: run one forward pass or pass input_shape")
        if structure != self._compiler.structure:
            self._compile(self._compiler.input_shape)
        return self._compiler

    def lipschitz_bound(self, progress: ProgressLike | None = None) -> LipschitzBound:
        """The proven bound for the current weights (cached until they change); ``progress``
        shows the computation node by node."""
        key = model_fingerprint(self.model)
        compiler = self._compiler_for(key.structure)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, compiler.sound_bound(estimate_steps=0, progress=progress))
        return self._cached[1]

    def margin(self) -> torch.Tensor:
        """(m, m) margin constants: differentiable estimate in training, proven bound in eval."""
        if self.training:
            return self.compiler.estimate(steps=self.power_steps)
        return self.lipschitz_bound().margin

    def _check_shape(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape[1:])
        if self._compiler is None:
            self._compile(shape)
        elif shape != self._compiler.input_shape:
            raise StaleBoundError(f"this GloRo net was compiled for inputs of shape {self._compiler.input_shape}, "
                                  f"not {shape}; build a GloRo net for that shape")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(x)
        logits = self.model(x)
        return torch.cat([logits, bottom_logit(logits, self.margin(), self.eps)[:, None]], dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes, with ``m`` (the bottom class) where the prediction is not certified.

        Always certifies with the proven bound, in training mode too.
        """
        self._check_shape(x)
        bound = self.lipschitz_bound()
        if not bound.sound:
            raise CertifyFxError("the Lipschitz bound is not proven for every factor; refusing to certify")
        pred, radius = certified_radius(self.model(x), bound.margin)
        m = bound.num_classes
        return torch.where(radius > self.eps, pred, torch.full_like(pred, m))

    def extra_repr(self) -> str:
        return f"eps={self.eps}, power_steps={self.power_steps}"


def bottom_logit(logits: torch.Tensor, margin: torch.Tensor, eps: float) -> torch.Tensor:
    """``max_{i != j} f_i + eps * K[j, i]`` with ``j = argmax f`` (masked by index)."""
    pred = logits.argmax(dim=1)
    k = round_up(margin, logits.dtype) if margin.dtype == torch.float64 and not margin.requires_grad else margin
    shifted = logits + eps * k.to(logits.device)[pred]
    shifted = shifted.scatter(1, pred[:, None], -torch.inf)
    return shifted.amax(dim=1)
