"""certify-fx: deterministic l2 robustness certification for real architectures.

>>> import certify_fx as cfx
>>> b = cfx.bound(model.eval(), (3, 32, 32))      # margin Lipschitz constants K[i, j]
>>> cert = cfx.certify(model, x, eps=36 / 255, bound=b)
>>> cert.certified, cert.radius
"""

from .bounds import BoundCompiler, LipschitzBound, NodeBound, bound, register_function_rule, register_module_rule
from .certify import Certificate, GloRo, bottom_logit, certified_radius, certify, verified_robust_accuracy
from .errors import CertifyFxError, NotLipschitzError, TraceError, UnsupportedNodeError

__version__ = "0.1.0"

__all__ = [
    "BoundCompiler",
    "Certificate",
    "CertifyFxError",
    "GloRo",
    "LipschitzBound",
    "NodeBound",
    "NotLipschitzError",
    "TraceError",
    "UnsupportedNodeError",
    "bottom_logit",
    "bound",
    "certified_radius",
    "certify",
    "register_function_rule",
    "register_module_rule",
    "verified_robust_accuracy",
]
