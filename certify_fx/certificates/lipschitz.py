"""The Lipschitz-margin certificate (GloRo): ``f_j - f_i > eps * K[j, i]`` for every ``i != j``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..bounds.compiler import bound as margin_bound
from ..bounds.result import LipschitzBound
from ..errors import CertifyFxError
from .base import Certificate, CertificateMethod, TopKCertificate, register_certificate
from .radius import certified_radius, check_logits, check_proven, top_k_radii

if TYPE_CHECKING:
    from ..bounds.capture import CaptureMode
    from ..progress import ProgressLike

__all__ = ["LipschitzMethod"]


@register_certificate
class LipschitzMethod(CertificateMethod):
    """Margins over the compiler's constants: the radius is ``min_{i != j} (f_j - f_i) / K[j, i]``.

    Args:
        use_estimate: certify with the power-iteration estimate instead of the proven bound (for
            reproducing papers; certificates are then marked ``sound=False``).
        top_k: certify that a class stays among the ``k`` largest logits instead of staying the
            largest (relaxed top-k; the certificates are :class:`TopKCertificate`).
    """

    name = "lipschitz"
    title = "proven bound"

    def __init__(self, use_estimate: bool = False, top_k: int = 1) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise CertifyFxError(f"top_k must be an integer >= 1, got {top_k!r}")
        self.use_estimate = bool(use_estimate)
        self.sound = not self.use_estimate
        self.top_k = top_k

    def prove(self, model: nn.Module, input_shape: tuple[int, ...], progress: ProgressLike | None = None,
              capture: CaptureMode = "auto") -> LipschitzBound:
        return margin_bound(model, input_shape, estimate_steps=100 if self.use_estimate else 0, progress=progress,
                            capture=capture)

    def margin_bound(self, bound: Any) -> LipschitzBound:
        """``bound`` itself, or the margin bound another method's constants carry (``.lipschitz``)."""
        if isinstance(bound, LipschitzBound):
            return bound
        inner = getattr(bound, "lipschitz", None)
        if isinstance(inner, LipschitzBound):
            return inner
        raise CertifyFxError(f"the Lipschitz certificate needs a LipschitzBound (certify_fx.bound), got "
                             f"{type(bound).__name__}")

    def check(self, model: nn.Module, bound: Any, input_shape: tuple[int, ...]) -> None:
        super().check(model, bound, input_shape)
        lipschitz = self.margin_bound(bound)
        check_proven(lipschitz.sound, lipschitz.finite, self.use_estimate)

    def _logits(self, model: nn.Module, x: torch.Tensor, bound: Any) -> tuple[torch.Tensor, torch.Tensor]:
        lipschitz = self.margin_bound(bound)
        with torch.inference_mode():
            logits = model(x)
        check_logits(logits, x.shape[0], lipschitz.num_classes)
        return logits, lipschitz.estimate if self.use_estimate else lipschitz.margin

    def radii(self, model: nn.Module, x: torch.Tensor, bound: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and the radius within which each stays among the top ``k`` (the argmax for ``k = 1``)."""
        if self.top_k == 1:
            return certified_radius(*self._logits(model, x, bound))
        cert = self.batch_certificate(model, x, 0.0, bound)
        return cert.pred, cert.radius

    def batch_certificate(self, model: nn.Module, x: torch.Tensor, eps: float, bound: Any) -> Certificate:
        if self.top_k == 1:
            return super().batch_certificate(model, x, eps, bound)
        logits, margin = self._logits(model, x, bound)
        classes = top_k_radii(logits, margin, self.top_k)
        pred = logits.argmax(dim=1)
        return TopKCertificate(pred, classes.gather(1, pred[:, None])[:, 0], eps, self.sound, classes, self.top_k)
