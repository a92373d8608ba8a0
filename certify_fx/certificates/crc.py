"""CRC-Lip (Singla & Feizi, 2022, Section 5): curvature-based certificates for ``f = h(g(x))``.

``g`` is the model's body (``forward_features``), whose l2 Lipschitz constant ``L_g`` the compiler
proves; ``h`` is a :class:`~certify_fx.nn.SoftplusMLP`. If ``h`` keeps its prediction ``l`` on the
ball of radius ``R`` around ``y0 = g(x)``, then ``f`` keeps it on the ball of radius ``R / L_g``
around ``x`` (Proposition 1 with ``L_g`` in place of 1).

**The certificate of ``h`` for one class ``j`` (Singla & Feizi, 2020).** Let ``z = h_l - h_j``,
``z(y0) > 0``, and ``-k I <= grad^2 z <= c I`` everywhere (:func:`margin_curvature`). The squared
distance to the decision boundary is ``p* = min {||y - y0||^2 / 2 : z(y) <= 0}``. For every
``0 <= eta < 1/k`` the Lagrangian ``F(y) = ||y - y0||^2 / 2 + eta z(y)`` is ``mu``-strongly convex
with ``mu = 1 - eta k``, and weak duality gives ``p* >= min_y F(y)``: any ``y`` with ``z(y) <= 0``
has ``||y - y0||^2 / 2 >= F(y)``. Strong convexity bounds the minimum from any point, solved or not:
``min F >= F(y) - ||grad F(y)||^2 / (2 mu)``. So every ``(eta, y)`` the solver visits yields a proven
``p* >= d``; the best is kept and the class's radius is ``sqrt(2 d)``. Following the paper, a
radius is used only where the solver reached its tolerance (``||grad F|| <= tol``); otherwise the
pair keeps its Lipschitz radius. Each pair's radius is the larger of the two proven ones, and the
input's radius is the smallest over classes.

The inner problems are solved by Nesterov's method for strongly convex functions (step ``1 / (1 + eta
c)``) and ``eta`` is found by bisection on the sign of ``z`` at the minimiser (complementary
slackness), all inputs and classes at once, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..bounds.compiler import BoundCompiler
from ..bounds.dependence import forward_hooks
from ..bounds.norms import SAFETY
from ..bounds.result import LipschitzBound
from ..errors import CertifyFxError
from ..models._classifier import TimmClassifier
from ..nn.softplus_mlp import SOFTPLUS_CURVATURE, SmoothSoftplus, SoftplusMLP
from .base import CertificateMethod, register_certificate
from .radius import check_bound, check_logits, check_proven, pair_radii, rounding_slack, smallest_radius

if TYPE_CHECKING:
    from ..bounds.capture import CaptureMode
    from ..progress import ProgressLike

__all__ = ["CRCLipMethod", "CurvatureBound", "curvature_bound", "curvature_radius", "margin_curvature"]

#: The paper's acceptance test: the gradient of the Lagrangian at the solution.
TOLERANCE = 1e-6


@dataclass
class CurvatureBound:
    """What CRC-Lip certifies with, computed once per model (reuse it across batches).

    Attributes:
        lipschitz: the whole model's margin bound (the Lipschitz radius, and the fingerprint).
        features: proven l2 Lipschitz constant of ``forward_features``.
        lower, upper: (m, m) float64; ``-lower[i, j] I <= grad^2 (h_i - h_j) <= upper[i, j] I``.
        sound: every factor proven.
    """

    lipschitz: LipschitzBound
    features: float
    lower: torch.Tensor
    upper: torch.Tensor
    sound: bool

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.lipschitz.input_shape)


class _Features(nn.Module):
    """``model.forward_features`` as a model of its own, for the compiler."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def crc_head(model: nn.Module) -> SoftplusMLP:
    """The model's :class:`SoftplusMLP` classifier, once it is certain that ``model(x)`` is exactly
    ``head(model.forward_features(x))``; a clear error otherwise.

    That identity is what makes the certificate of the head one of the model, so it is checked on
    the code, not on an example: a zoo model (:class:`~certify_fx.models.TimmClassifier`) whose
    class keeps the base ``forward`` and ``forward_head``, and a head that is exactly ``Linear ->
    SmoothSoftplus -> Linear`` with no forward hooks.
    """
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, SoftplusMLP):
        found = type(head).__name__ if head is not None else "no get_classifier()"
        raise CertifyFxError(f"method='crc' certifies models whose get_classifier() is a certify_fx.nn.SoftplusMLP; "
                             f"{type(model).__name__} has {found} (e.g. create_model('lipconvnet_5', head='mlp'))")
    cls = type(model)
    if not (isinstance(model, TimmClassifier) and cls.forward is TimmClassifier.forward
            and cls.forward_head is TimmClassifier.forward_head):
        raise CertifyFxError(f"method='crc' needs model(x) == get_classifier()(forward_features(x)) by construction: a "
                             f"certify_fx.models.TimmClassifier that keeps its forward and forward_head; "
                             f"{cls.__name__} does not")
    parts = {"head": head, "head.fc1": head.fc1, "head.act": head.act, "head.fc2": head.fc2}
    exact = (type(head).forward is SoftplusMLP.forward and type(head.fc1) is nn.Linear
             and type(head.fc2) is nn.Linear and type(head.act) is SmoothSoftplus)
    if not exact:
        raise CertifyFxError("method='crc' needs the head to be exactly Linear -> SmoothSoftplus -> Linear; found "
                             + ", ".join(f"{name}: {type(m).__name__}" for name, m in parts.items()))
    hooked = [name for name, m in parts.items() if forward_hooks(m)]
    if hooked:
        raise CertifyFxError(f"method='crc': {hooked[0]} has a forward hook, which the curvature bound does not "
                             "cover; remove it (handle.remove())")
    return head


@torch.no_grad()
def margin_curvature(head: SoftplusMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """Proven curvature bounds of every margin of ``head``: ``(lower, upper)``, each (m, m) float64,
    with ``-lower[i, j] I <= grad^2 (h_i - h_j)(y) <= upper[i, j] I`` for all ``y``.

    ``upper[i, j] = lambda_max(W1^T diag(max(w2_i - w2_j, 0) / 4) W1)`` (module docstring of
    :mod:`certify_fx.nn.softplus_mlp`), computed on the smaller of ``W1^T D W1`` and
    ``D^1/2 W1 W1^T D^1/2`` (same nonzero eigenvalues), with a rounding allowance; ``lower`` is
    its transpose (``h_j - h_i`` has the opposite curvature).
    """
    w1 = head.fc1.weight.detach().to(torch.float64)  # (H, d)
    w2 = head.fc2.weight.detach().to(torch.float64)  # (m, H)
    positive = (w2[:, None, :] - w2[None, :, :]).clamp_min(0) * SOFTPLUS_CURVATURE  # (m, m, H)
    hidden, features = w1.shape
    if hidden <= features:
        root = positive.sqrt()
        gram = root[..., :, None] * (w1 @ w1.T) * root[..., None, :]
    else:
        gram = torch.einsum("hd,ijh,he->ijde", w1, positive, w1)
    eigenvalues = torch.linalg.eigvalsh(gram)
    size = gram.shape[-1]
    # eigvalsh is backward stable: the computed values are exact for a matrix within
    # ~size * 2^-52 * ||gram||_F; the allowance is far larger than that
    allowance = gram.flatten(-2).norm(dim=-1) * size * 1e-13
    upper = (eigenvalues[..., -1].clamp_min(0) * (1 + SAFETY) + allowance).fill_diagonal_(0)
    return upper.T.contiguous(), upper


@torch.no_grad()
def curvature_bound(model: nn.Module, input_shape: tuple[int, ...], lipschitz: LipschitzBound | None = None,
                    progress: ProgressLike | None = None, capture: CaptureMode = "auto") -> CurvatureBound:
    """The proven constants :func:`curvature_radius` needs, for ``model`` on inputs of ``input_shape``.

    Raises:
        CertifyFxError: the model's classifier is not a :class:`SoftplusMLP`.
    """
    head = crc_head(model)
    if lipschitz is None:
        lipschitz = BoundCompiler(model, input_shape, capture=capture).sound_bound(estimate_steps=0, progress=progress)
    features = BoundCompiler(_Features(model), input_shape, capture=capture).output_lipschitz(progress=progress)
    lower, upper = margin_curvature(head)
    sound = lipschitz.sound and features.sound and bool(torch.isfinite(upper).all())
    return CurvatureBound(lipschitz, float(features.bound), lower, upper, sound)


def _margins(y: torch.Tensor, v: torch.Tensor, offset: torch.Tensor, w1: torch.Tensor,
             b1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z(y) = v . softplus(W1 y + b1) + offset`` and its gradient, for a batch of problems."""
    pre = y @ w1.T + b1
    value = (torch.logaddexp(pre, torch.zeros((), dtype=pre.dtype)) * v).sum(-1) + offset
    return value, (torch.sigmoid(pre) * v) @ w1


@torch.no_grad()
def curvature_radius(head: SoftplusMLP, features: torch.Tensor, pred: torch.Tensor, lower: torch.Tensor,
                     upper: torch.Tensor, classes: torch.Tensor, *, slack: torch.Tensor | None = None,
                     bisections: int = 16, steps: int = 60, tol: float = TOLERANCE) -> torch.Tensor:
    """Proven distances, in feature space, from ``features`` to ``head``'s decision boundaries.

    Args:
        features: (N, d) the body's output ``y0`` per input.
        pred: (N,) the predicted class ``l`` per input.
        lower, upper: :func:`margin_curvature` of ``head``.
        classes: (N, k) the classes ``j`` to certify against, per input.
        slack: (N, k) how far rounding may move each computed margin: the radius is to the set where
            the exact margin ``z`` falls to ``slack`` (not 0), so a float32 margin within rounding of
            the boundary never counts as certified.
        bisections, steps: bisection steps on ``eta`` and Nesterov steps per ``eta``.
        tol: the gradient norm a solution must reach to count.

    Returns:
        (N, k) float64: the radius against each class; 0 where ``z(y0) <= 0`` or the solver did not
        reach ``tol`` (see the module docstring for the proof).
    """
    n, k = classes.shape
    w1, b1 = head.fc1.weight.to(torch.float64), head.fc1.bias.to(torch.float64)
    w2, b2 = head.fc2.weight.to(torch.float64), head.fc2.bias.to(torch.float64)
    rows, cols = pred[:, None].expand(n, k).reshape(-1), classes.reshape(-1)
    v, offset = w2[rows] - w2[cols], b2[rows] - b2[cols]
    if slack is not None:
        offset = offset - slack.reshape(-1).to(offset)
    y0 = features.to(torch.float64).repeat_interleave(k, dim=0)
    bend, lift = lower[rows, cols].to(torch.float64), upper[rows, cols].to(torch.float64)
    z0, g0 = _margins(y0, v, offset, w1, b1)
    # eta < 1/bend keeps F strongly convex; a convex margin (bend 0) gets a generous finite cap
    linear = z0.clamp_min(0) / (g0.square().sum(-1) + 1e-30)  # the optimum if z were linear
    cap = torch.where(bend > 0, (1 - 1e-3) / bend.clamp_min(1e-300), 1e3 * linear + 1.0)
    low, high = torch.zeros_like(cap), cap.clone()
    z_low, z_high = z0, torch.full_like(z0, -torch.inf)  # z at the minimiser for eta = low, high
    eta = torch.minimum(linear, 0.5 * cap)
    y = y0.clone()
    best = torch.zeros_like(z0)
    for _ in range(bisections):
        mu, smooth = 1 - eta * bend, 1 + eta * lift
        momentum = ((smooth.sqrt() - mu.sqrt()) / (smooth.sqrt() + mu.sqrt()))[:, None]
        previous = y
        for step in range(1, steps + 1):
            look = y + momentum * (y - previous)
            _, grad_z = _margins(look, v, offset, w1, b1)
            previous, y = y, look - ((look - y0) + eta[:, None] * grad_z) / smooth[:, None]
            if step % 5 == 0 or step == steps:
                z, grad_z = _margins(y, v, offset, w1, b1)
                residual = ((y - y0) + eta[:, None] * grad_z).norm(dim=-1)
                if bool((residual <= 0.01 * tol).all()):
                    break
        lagrangian = 0.5 * (y - y0).square().sum(-1) + eta * z
        dual = lagrangian - residual.square() / (2 * mu)
        dual = dual - 1e-12 * (lagrangian.abs() + 1)  # float64 rounding of the sums above
        accept = (residual <= tol) & torch.isfinite(dual) & (z0 > 0)
        best = torch.where(accept, torch.maximum(best, dual), best)
        # complementary slackness: the optimum eta puts the minimiser on the boundary, z = 0; z
        # falls as eta grows (it is the derivative of the concave dual), so bracket its root and
        # interpolate (regula falsi), or grow eta by 4x while no eta with z < 0 was seen
        safe = z > 0
        low, z_low = torch.where(safe, eta, low), torch.where(safe, z, z_low)
        high, z_high = torch.where(safe, high, eta), torch.where(safe, z_high, z)
        bracketed = torch.isfinite(z_high)
        secant = low + (high - low) * z_low / (z_low - z_high).clamp_min(1e-300)
        inside = (secant > low + 0.05 * (high - low)) & (secant < high - 0.05 * (high - low))
        eta = torch.where(bracketed, torch.where(inside, secant, 0.5 * (low + high)), torch.minimum(4 * eta, 0.5 * (eta + cap)))
        if bool((bracketed & (high - low <= 1e-3 * high)).all()):
            break
    radius = (2 * best).sqrt()
    return torch.where(torch.isfinite(radius), radius, torch.zeros_like(radius)).reshape(n, k)


@register_certificate
class CRCLipMethod(CertificateMethod):
    """CRC-Lip (module docstring): for a model whose classifier is a
    :class:`~certify_fx.nn.SoftplusMLP`, each class keeps the larger of its Lipschitz radius and
    its curvature radius; the input's radius is the smallest over classes.

    Args:
        classes: solve only for the ``classes`` classes nearest by the Lipschitz radius (the
            others keep their Lipschitz radius: sound either way, faster with many classes).
            All if None.
    """

    name = "crc"
    title = "CRC-Lip certificate"

    def __init__(self, classes: int | None = None) -> None:
        self.classes = classes

    def prove(self, model: nn.Module, input_shape: tuple[int, ...], progress: ProgressLike | None = None,
              capture: CaptureMode = "auto") -> CurvatureBound:
        return curvature_bound(model, input_shape, progress=progress, capture=capture)

    def margin_bound(self, bound: CurvatureBound) -> LipschitzBound:
        if not isinstance(bound, CurvatureBound):
            raise CertifyFxError(f"the CRC-Lip certificate needs a CurvatureBound (certify_fx.curvature_bound), got "
                                 f"{type(bound).__name__}")
        return bound.lipschitz

    def constants(self, bound: CurvatureBound) -> dict[str, float]:
        return {**super().constants(bound), "Lipschitz of features": bound.features}

    def check(self, model: nn.Module, bound: CurvatureBound, input_shape: tuple[int, ...]) -> None:
        super().check(model, bound, input_shape)
        crc_head(model)
        check_proven(bound.sound, bound.lipschitz.finite)

    def certify(self, model: nn.Module, x: torch.Tensor, eps: float, bound: object = None):
        """As :meth:`CertificateMethod.certify`; a given margin bound (``certify_fx.bound``) is
        checked first and the curvature constants are built on it."""
        if isinstance(bound, LipschitzBound):
            check_bound(model, bound, tuple(x.shape[1:]))
            bound = curvature_bound(model, tuple(x.shape[1:]), lipschitz=bound)
        return super().certify(model, x, eps, bound)

    def radii(self, model: nn.Module, x: torch.Tensor, bound: CurvatureBound) -> tuple[torch.Tensor, torch.Tensor]:
        head = crc_head(model)
        with torch.inference_mode():
            features = model.forward_features(x)
            logits = model.forward_head(features)  # timm's contract: model(x) == forward_head(forward_features(x))
        check_logits(logits, x.shape[0], bound.lipschitz.num_classes)
        pred, pairs = pair_radii(logits, bound.lipschitz.margin)
        m = pairs.shape[1]
        if m > 1:
            k = m - 1 if self.classes is None else max(1, min(int(self.classes), m - 1))
            nearest = pairs.nan_to_num(nan=0.0).topk(k, dim=1, largest=False).indices  # pred (inf) is never chosen
            # the same rounding slack as the Lipschitz radius: the boundary proven is z = slack, not z = 0
            slack = rounding_slack(logits, pred).gather(1, nearest)
            curved = curvature_radius(head, features.flatten(1), pred, bound.lower, bound.upper, nearest,
                                      slack=slack)
            curved = torch.where(pairs.gather(1, nearest) > 0, curved / bound.features, 0.0)  # the gap must be positive
            pairs = pairs.scatter(1, nearest, torch.maximum(pairs.gather(1, nearest), curved))
        return pred, smallest_radius(pairs)
