"""certify-fx: deterministic l2 robustness certification for real architectures.

>>> import certify_fx as cfx, timm, torch
>>> model = cfx.convert(timm.create_model("resnet18", num_classes=10), to="liresnet", input_shape=(3, 32, 32))
>>> b = cfx.bound(model.eval(), (3, 32, 32))      # margin Lipschitz constants K[i, j]
>>> cert = cfx.certify(model, torch.rand(8, 3, 32, 32), eps=36 / 255, bound=b)
>>> cert.certified.shape, cert.radius.shape
(torch.Size([8]), torch.Size([8]))

Training lives in :mod:`certify_fx.train` (recipes, trainer), :mod:`certify_fx.losses` and
:mod:`certify_fx.data`; models in :mod:`certify_fx.models` (registered with timm on import).
"""

from importlib import metadata as _metadata

from .bounds import (
    BoundCompiler,
    LipschitzBound,
    NodeBound,
    bound,
    register_function_rule,
    register_module_rule,
    register_rule,
)
from .certificates import (
    CERTIFICATE_METHODS,
    Certificate,
    CertificateMethod,
    CertifiedEvaluation,
    CurvatureBound,
    TopKCertificate,
    certified_radius,
    check_bound,
    curvature_bound,
    evaluate_certified,
    register_certificate,
)
from .certify import certificate_bound, certify, verified_robust_accuracy
from .audit import AuditReport, audit
from .errors import (
    CertifyFxError,
    CheckpointError,
    DatasetNotFoundError,
    NotLipschitzError,
    RecipeError,
    StaleBoundError,
    TraceError,
    UnsupportedNodeError,
)
from . import models  # noqa: F401  (registers the certify-fx families with timm)
from .loading import LoadedModel, load_model
from .losses import GloRo, bottom_logit, create_loss
from .model_spec import ModelSpec
from .model_record import ModelRecord, load_converted, save_converted
from .transforms import Rewrite, convert
from .weights import load_weights

try:
    __version__ = _metadata.version("certify-fx")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = [
    "AuditReport",
    "CERTIFICATE_METHODS",
    "BoundCompiler",
    "Certificate",
    "CertificateMethod",
    "CertifiedEvaluation",
    "CertifyFxError",
    "CurvatureBound",
    "CheckpointError",
    "DatasetNotFoundError",
    "GloRo",
    "LoadedModel",
    "LipschitzBound",
    "ModelRecord",
    "ModelSpec",
    "NodeBound",
    "NotLipschitzError",
    "RecipeError",
    "Rewrite",
    "StaleBoundError",
    "TopKCertificate",
    "TraceError",
    "UnsupportedNodeError",
    "audit",
    "bottom_logit",
    "bound",
    "certificate_bound",
    "certified_radius",
    "certify",
    "check_bound",
    "convert",
    "curvature_bound",
    "evaluate_certified",
    "create_loss",
    "load_converted",
    "load_model",
    "load_weights",
    "register_certificate",
    "register_function_rule",
    "register_module_rule",
    "register_rule",
    "save_converted",
    "verified_robust_accuracy",
]
