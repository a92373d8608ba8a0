"""What a certificate method is, the table of them, and the certified predictions of a batch.

A method proves its constants once for a model and an input shape (:meth:`CertificateMethod.prove`,
the slow part) and then certifies batch after batch with them (:meth:`CertificateMethod.radii`,
about one forward pass). Methods are registered by name with :func:`register_certificate`, so
``certify(..., method=name)``, the CLI's ``--method`` choices and the trainer all read one table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from ..bounds.result import LipschitzBound
from ..errors import CertifyFxError
from .radius import check_bound, check_eps

if TYPE_CHECKING:
    from ..bounds.capture import CaptureMode
    from ..progress import ProgressLike

__all__ = ["CERTIFICATE_METHODS", "Certificate", "CertificateMethod", "TopKCertificate", "certificate_method",
           "register_certificate"]


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

    #: how many top classes a prediction may fall among (1: the argmax itself)
    top_k: ClassVar[int] = 1

    def correct(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the prediction is right (the label is the argmax)."""
        return self.pred == labels.to(self.pred.device)

    def defended(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class each point's certificate is about, and its radius: the prediction here (an
        attack must change the argmax); the label for a :class:`TopKCertificate`."""
        return self.pred, self.radius

    def label_radius(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) the certified radius of each point, 0 where the prediction is wrong."""
        return torch.where(self.correct(labels), self.radius, torch.zeros_like(self.radius))

    def accuracy(self, labels: torch.Tensor) -> float:
        return self.correct(labels).float().mean().item()

    def verified_robust_accuracy(self, labels: torch.Tensor, eps: float | None = None) -> float:
        """Fraction of points both correct and certified at ``eps`` (default: ``self.eps``)."""
        return (self.label_radius(labels) > check_eps(self.eps if eps is None else eps)).float().mean().item()


@dataclass
class TopKCertificate(Certificate):
    """Relaxed top-k certificates (Leino et al., 2021, Section 6): a class is certified at ``eps``
    if it provably stays among the ``k`` largest logits everywhere in the l2 ball of radius ``eps``.

    Attributes:
        class_radius: (N, m) the radius within which each class stays in the top ``k``
            (:func:`~certify_fx.certificates.top_k_radii`); ``radius`` is the predicted class's.
        k: the ``k`` of top-k.

    ``correct`` means the label is among the top ``k`` logits, and the VRA counts the points whose
    label is certified to stay there.
    """

    class_radius: torch.Tensor = None  # type: ignore[assignment]
    k: int = 1

    @property
    def top_k(self) -> int:  # type: ignore[override]
        return self.k

    def correct(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the label is among the ``k`` largest logits by more than the rounding slack
        (its top-k radius is positive; a tie at the edge does not count)."""
        return self.label_radius(labels) > 0

    def defended(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.to(self.pred.device)
        return labels, self.label_radius(labels)

    def label_radius(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_radius.gather(1, labels.to(self.class_radius.device)[:, None])[:, 0]


class CertificateMethod(ABC):
    """A way to certify: its constants, proven once, and the radii of a batch from them.

    Subclasses set ``name``, implement :meth:`prove`, :meth:`margin_bound` and :meth:`radii`, and
    are registered with :func:`register_certificate`; options are constructor arguments.
    """

    #: the name ``certify(..., method=...)`` and ``--method`` use
    name: ClassVar[str]
    #: what a report calls the certificate
    title: ClassVar[str]
    #: True if the radii rest only on proven constants
    sound: bool = True

    @abstractmethod
    def prove(self, model: nn.Module, input_shape: tuple[int, ...], progress: ProgressLike | None = None,
              capture: CaptureMode = "auto") -> Any:
        """The constants this method certifies with, for ``model`` on inputs of ``input_shape``
        (``capture``: how the model's graph is built, see :func:`certify_fx.bound`)."""

    @abstractmethod
    def margin_bound(self, bound: Any) -> LipschitzBound:
        """The margin Lipschitz bound ``bound`` rests on (the model it was proven for, ``K``)."""

    @abstractmethod
    def radii(self, model: nn.Module, x: torch.Tensor, bound: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions (N,) and certified radii (N,) float64 of the batch ``x``, with a ``bound``
        already checked by :meth:`check`."""

    def batch_certificate(self, model: nn.Module, x: torch.Tensor, eps: float, bound: Any) -> Certificate:
        """The certificate of the batch ``x`` at ``eps``, with a ``bound`` already checked."""
        pred, radius = self.radii(model, x, bound)
        return Certificate(pred, radius, eps, sound=self.sound)

    def constants(self, bound: Any) -> dict[str, float]:
        """The proven constants a report shows, by label (the largest ``K[i, j]`` and any others)."""
        return {"max K[i, j]": self.margin_bound(bound).max_margin}

    def check(self, model: nn.Module, bound: Any, input_shape: tuple[int, ...]) -> None:
        """Raise unless ``bound`` is this method's, proven, and for ``model`` as it is now on inputs
        of ``input_shape`` (:class:`~certify_fx.StaleBoundError`, :class:`~certify_fx.errors.UnprovenBoundError`)."""
        check_bound(model, self.margin_bound(bound), input_shape)

    def certify(self, model: nn.Module, x: torch.Tensor, eps: float, bound: Any = None) -> Certificate:
        """Certify the batch ``x`` at ``eps``: proves the constants first if ``bound`` is None."""
        eps = check_eps(eps)
        shape = tuple(x.shape[1:])
        bound = self.prove(model, shape) if bound is None else bound
        self.check(model, bound, shape)
        return self.batch_certificate(model, x, eps, bound)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


#: Certificate methods by name, in registration order.
CERTIFICATE_METHODS: dict[str, type[CertificateMethod]] = {}

_Method = TypeVar("_Method", bound=type[CertificateMethod])


def register_certificate(cls: _Method) -> _Method:
    """Class decorator: make ``cls`` available as ``method=cls.name``."""
    if cls.name in CERTIFICATE_METHODS:
        raise CertifyFxError(f"a certificate method named {cls.name!r} is already registered")
    CERTIFICATE_METHODS[cls.name] = cls
    return cls


def certificate_method(method: str | CertificateMethod, **options: Any) -> CertificateMethod:
    """The method ``method`` names, built with ``options`` (``None`` values are left at their
    defaults); a :class:`CertificateMethod` is returned as it is."""
    if isinstance(method, CertificateMethod):
        return method
    cls = CERTIFICATE_METHODS.get(method)
    if cls is None:
        raise CertifyFxError(f"unknown certificate method {method!r}; choose one of {', '.join(CERTIFICATE_METHODS)}")
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return cls(**given)
    except TypeError as exc:
        raise CertifyFxError(f"certificate method {method!r} does not take {sorted(given)}: {exc}") from None
