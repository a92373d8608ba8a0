"""Operator norms (power iteration, sound FFT/SVD bounds) and the graph bound compiler."""

from .compiler import BoundCompiler, bound
from .result import LipschitzBound
from .values import NodeBound
from .norms import NormBound, conv2d_norm_bound, dense_norm_bound
from .power_iteration import PowerIteration, power_iteration
from .registry import register_function_rule, register_module_rule, register_rule

__all__ = [
    "BoundCompiler",
    "LipschitzBound",
    "NodeBound",
    "NormBound",
    "PowerIteration",
    "bound",
    "conv2d_norm_bound",
    "dense_norm_bound",
    "power_iteration",
    "register_function_rule",
    "register_module_rule",
    "register_rule",
]
