"""certify-fx: deterministic l2 robustness certification for real architectures.

>>> import certify_fx as cfx
>>> model = cfx.convert(timm_resnet.eval(), to="liresnet", input_shape=(3, 224, 224))
>>> b = cfx.bound(model.eval(), (3, 32, 32))      # margin Lipschitz constants K[i, j]
>>> cert = cfx.certify(model, x, eps=36 / 255, bound=b)
>>> cert.certified, cert.radius

Training lives in :mod:`certify_fx.train` (recipes, trainer), :mod:`certify_fx.losses` and
:mod:`certify_fx.data`; models in :mod:`certify_fx.models` (registered with timm on import).
"""

from .bounds import (
    BoundCompiler,
    LipschitzBound,
    NodeBound,
    bound,
    register_function_rule,
    register_module_rule,
    register_rule,
)
from .certify import Certificate, GloRo, bottom_logit, certified_radius, certify, check_bound, verified_robust_accuracy
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
from .losses import create_loss
from .transforms import Rewrite, convert, load_converted, save_converted

__version__ = "0.1.0"

__all__ = [
    "BoundCompiler",
    "Certificate",
    "CertifyFxError",
    "CheckpointError",
    "DatasetNotFoundError",
    "GloRo",
    "LipschitzBound",
    "NodeBound",
    "NotLipschitzError",
    "RecipeError",
    "Rewrite",
    "StaleBoundError",
    "TraceError",
    "UnsupportedNodeError",
    "bottom_logit",
    "bound",
    "certified_radius",
    "certify",
    "check_bound",
    "convert",
    "create_loss",
    "load_converted",
    "register_function_rule",
    "register_module_rule",
    "register_rule",
    "save_converted",
    "verified_robust_accuracy",
]
