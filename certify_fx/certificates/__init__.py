"""Certificates: what a certified prediction rests on, as objects.

A :class:`CertificateMethod` proves its constants once for a model and an input shape and then
certifies batch after batch; the methods are registered by name in :data:`CERTIFICATE_METHODS`:

- ``"lipschitz"`` (:class:`LipschitzMethod`): margins over the compiler's constants ``K[i, j]``;
- ``"crc"`` (:class:`CRCLipMethod`): CRC-Lip curvature certificates for a softplus-MLP classifier.

:func:`evaluate_certified` is the one loop over a dataset (VRA per radius) that
:func:`certify_fx.verified_robust_accuracy`, the trainer, the CLI and :func:`certify_fx.audit` use.
"""

from .base import (
    CERTIFICATE_METHODS,
    Certificate,
    CertificateMethod,
    TopKCertificate,
    certificate_method,
    register_certificate,
)
from .lipschitz import LipschitzMethod
from .crc import CRCLipMethod, CurvatureBound, curvature_bound, curvature_radius, margin_curvature
from .evaluation import BatchHook, CertifiedEvaluation, evaluate_certified
from .radius import (
    ROUNDING_SLACK_ULPS,
    certified_radius,
    check_bound,
    check_eps,
    check_input_shape,
    pair_radii,
    round_up,
    rounding_slack,
    top_k_radii,
)

__all__ = [
    "BatchHook",
    "CERTIFICATE_METHODS",
    "CRCLipMethod",
    "Certificate",
    "CertificateMethod",
    "CertifiedEvaluation",
    "CurvatureBound",
    "LipschitzMethod",
    "TopKCertificate",
    "ROUNDING_SLACK_ULPS",
    "certificate_method",
    "certified_radius",
    "check_bound",
    "check_eps",
    "check_input_shape",
    "curvature_bound",
    "curvature_radius",
    "evaluate_certified",
    "margin_curvature",
    "pair_radii",
    "register_certificate",
    "round_up",
    "rounding_slack",
    "top_k_radii",
]
