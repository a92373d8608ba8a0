"""The front door: certify a batch, prove a method's constants, certify a dataset.

A prediction ``j`` at ``x`` is robust at radius ``eps`` iff ``f_j(x) - f_i(x) > eps * K[j, i]``
for every ``i != j`` (Leino et al., 2021); :mod:`certify_fx.certificates` holds the methods
(Lipschitz margins, CRC-Lip) and the radius arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from .bounds.result import LipschitzBound
from .certificates import Certificate, CertificateMethod, certificate_method, evaluate_certified

if TYPE_CHECKING:
    from .bounds.capture import CaptureMode
    from .progress import ProgressLike

__all__ = ["certificate_bound", "certify", "verified_robust_accuracy"]


def certify(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    bound: Any = None,
    *,
    use_estimate: bool = False,
    method: str | CertificateMethod = "lipschitz",
    crc_classes: int | None = None,
    top_k: int = 1,
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
            reproducing papers; the certificate is then marked ``sound=False``; ``"lipschitz"`` only).
        method: a name in :data:`~certify_fx.certificates.CERTIFICATE_METHODS`: ``"lipschitz"``
            (margins over the Lipschitz constants ``K``) or ``"crc"`` (CRC-Lip, for a model whose
            classifier is a :class:`~certify_fx.nn.SoftplusMLP`; each class keeps the larger of
            its two proven radii); or a :class:`~certify_fx.certificates.CertificateMethod`.
        crc_classes: with ``"crc"``, solve for the ``crc_classes`` classes nearest by the Lipschitz
            radius only (the others keep their Lipschitz radius; sound either way). All if None.
        top_k: certify that a class stays among the ``top_k`` largest logits inside the ball
            (relaxed top-k, ``"lipschitz"`` only): returns a
            :class:`~certify_fx.certificates.TopKCertificate`, whose ``label_radius(y)`` and
            ``verified_robust_accuracy(y)`` are about the labels ``y``.

    Raises:
        UnprovenBoundError: the bound is not proven (``bound.sound`` False) and ``use_estimate`` is False.
        StaleBoundError: ``bound`` was computed for another input shape, other weights or another
            structure than ``model`` has now.
        CertifyFxError: ``eps`` is not a finite number >= 0, the logits are half/bfloat16, an
            unknown ``method`` or an option it does not take, or ``"crc"`` for a model without a
            softplus MLP classifier.
    """
    chosen = certificate_method(method, use_estimate=use_estimate or None, classes=crc_classes,
                                top_k=None if top_k == 1 else top_k)
    return chosen.certify(model, x, eps, bound)


def certificate_bound(model: nn.Module, input_shape: tuple[int, ...], method: str | CertificateMethod = "lipschitz",
                      progress: ProgressLike | None = None, capture: CaptureMode = "auto") -> Any:
    """The proven constants a certificate of ``method`` rests on, computed once for many batches of
    :func:`certify`: :func:`certify_fx.bound` for ``"lipschitz"``, :func:`certify_fx.curvature_bound`
    (which holds that bound too) for ``"crc"``. ``capture``: how the model's graph is built
    (symbolic tracing, with ``torch.export`` where it fails; see :func:`certify_fx.bound`)."""
    return certificate_method(method).prove(model, input_shape, progress=progress, capture=capture)


def verified_robust_accuracy(
    model: nn.Module,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float | Iterable[float],
    bound: LipschitzBound | None = None,
    device: torch.device | str | None = None,
    method: str | CertificateMethod = "lipschitz",
) -> dict[str, float | dict[float, float]]:
    """Clean accuracy and VRA at each ``eps`` over batches of ``(x, y)``
    (:func:`~certify_fx.certificates.evaluate_certified` keeps more: radii, counts).

    Returns ``{"clean_accuracy": a, "vra": {eps: v, ...}}``.
    """
    radii = [eps] if isinstance(eps, (int, float)) else list(eps)
    result = evaluate_certified(model, data, radii, method, bound, device=device)
    return {"clean_accuracy": result.clean_accuracy, "vra": result.vra}
