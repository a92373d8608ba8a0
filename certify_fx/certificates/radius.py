"""Certified radii from logits and margin constants, and the checks every certificate shares.

A prediction ``j`` at ``x`` is robust at radius ``eps`` iff ``f_j(x) - f_i(x) > eps * K[j, i]``
for every ``i != j`` (Leino et al., 2021), so the certified radius is
``min_{i != j} (f_j - f_i) / K[j, i]``. The predicted class is the argmax *index*: tied logits
give a zero margin and never certify, and a zero constant with a zero margin (0/0) is radius 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..bounds.fingerprint import model_fingerprint
from ..bounds.result import FULL_PRECISION, LipschitzBound
from ..errors import CertifyFxError, StaleBoundError, UnprovenBoundError

__all__ = ["ROUNDING_SLACK_ULPS", "certified_radius", "check_bound", "check_eps", "check_input_shape", "check_logits",
           "check_proven", "pair_radii", "round_up", "rounding_slack", "smallest_radius", "top_k_radii"]

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


def check_proven(sound: bool, finite: bool, use_estimate: bool = False) -> None:
    """Raise :class:`UnprovenBoundError` for a bound with an unproven (or non-finite) factor,
    unless certifying with estimates was asked for."""
    if not use_estimate and not sound:
        reason = "it is not finite (NaN/inf weights?)" if not finite else "not every factor is proven"
        raise UnprovenBoundError(f"the Lipschitz bound is not proven ({reason}; bound.sound is False); refusing "
                                 "to certify. Pass use_estimate=True to certify with estimates")


def check_logits(logits: object, batch: int, num_classes: int) -> None:
    """Raise :class:`StaleBoundError` unless ``logits`` is a (batch, num_classes) tensor."""
    if not isinstance(logits, torch.Tensor) or logits.shape != (batch, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise StaleBoundError(f"the model returned logits of shape {shape} for {batch} inputs; the bound is for "
                              f"(batch, {num_classes}) logits")


def certified_radius(logits: torch.Tensor, margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and certified radii (float64) from logits (N, m) and margin constants K (m, m).

    Everything is compared in float64 with a rounding slack (:data:`ROUNDING_SLACK_ULPS`). Fails
    closed: a row of logits with a NaN/inf, or a NaN/inf anywhere in ``K``, gets radius 0; ties and
    0/0 get radius 0. Half and bfloat16 logits are refused: their rounding is not covered.
    """
    pred, pairs = pair_radii(logits, margin)
    return pred, smallest_radius(pairs)


def smallest_radius(pairs: torch.Tensor) -> torch.Tensor:
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


#: float64 entries :func:`top_k_radii` holds at once (the (rows, m, m) gaps of a chunk)
_TOP_K_CHUNK = 1 << 24


def top_k_radii(logits: torch.Tensor, margin: torch.Tensor, k: int) -> torch.Tensor:
    """(N, m) float64: per input and class ``c``, a radius within which ``c`` provably stays among
    the ``k`` largest logits (relaxed top-k robustness; Leino et al., 2021, Section 6).

    Class ``i`` can overtake ``c`` inside the ball of radius ``r`` only if ``f_c - f_i <= r K[c, i]``,
    so at most ``k - 1`` classes can overtake ``c`` inside the ``k``-th smallest of the pair radii
    ``(f_c - f_i) / K[c, i]`` over ``i != c`` (0 for a class already above ``c``): ``c`` keeps at
    most ``k - 1`` classes above it. The gaps carry the same rounding slack as
    :func:`pair_radii`; a row with a NaN/inf logit, or a NaN/inf in ``K``, gets radius 0 for every
    class. ``k = 1`` gives the predicted class its :func:`certified_radius` (and 0 to the others).
    """
    if logits.dtype not in FULL_PRECISION:
        raise CertifyFxError(f"logits are {logits.dtype}; certificates need float32 or float64 logits")
    m = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < m:
        raise CertifyFxError(f"top_k must be an integer in [1, {m - 1}] for {m} classes, got {k!r}")
    values = logits.detach().to(torch.float64)
    K = margin.detach().to(device=values.device, dtype=torch.float64)
    ulp = ROUNDING_SLACK_ULPS * torch.finfo(logits.dtype).eps
    finite_k = bool(torch.isfinite(K).all())
    eye = torch.eye(m, dtype=torch.bool, device=values.device)
    out = []
    for chunk in values.split(max(1, _TOP_K_CHUNK // (m * m))):
        gap = chunk[:, :, None] - chunk[:, None, :]  # [n, c, i] = f_c - f_i
        gap = gap - ulp * (chunk.abs()[:, :, None] + chunk.abs()[:, None, :])
        ratio = torch.where(K > 0, gap / K.clamp_min(torch.finfo(torch.float64).tiny),
                            torch.where(gap > 0, torch.inf, 0.0)).clamp_min(0.0)
        ratio = torch.nan_to_num(ratio, nan=0.0, posinf=torch.inf).masked_fill(eye, torch.inf)  # i == c by index
        radius = ratio.kthvalue(k, dim=2).values
        finite = torch.isfinite(chunk).all(dim=1, keepdim=True) & finite_k
        out.append(torch.where(finite, radius, 0.0))
    return torch.cat(out) if out else values.new_zeros(0, m)
