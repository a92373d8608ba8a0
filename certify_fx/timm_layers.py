"""timm's layer classes that certify-fx gives a meaning to, named in one place.

timm is a dependency, but its layer zoo moves between releases: a class missing from the
installed version is simply left out of these tables (never an import error). The rule table,
the tracer and the passes import the classes from here, never by name from timm.
"""

from __future__ import annotations

from importlib import import_module

from timm.layers import _fx as timm_fx
from torch import nn

__all__ = ["ACTIVATIONS", "CHANNELS_FIRST_LAYER_NORMS", "CHANNELS_LAST_LAYER_NORMS", "DROP_PATH", "NORM_ACT",
           "NORMALIZATION", "SCALE_FREE", "notrace_functions", "notrace_modules"]


def _classes(module: str, *names: str) -> tuple[type[nn.Module], ...]:
    """The classes ``names`` of ``module`` that the installed timm has."""
    found = import_module(module)
    return tuple(cls for name in names if isinstance(cls := getattr(found, name, None), type))


#: activation modules, by their name in ``timm.layers.activations`` (their constants are in the rules)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in _classes("timm.layers.activations", "GELU", "GELUTanh", "Swish", "Mish", "Sigmoid",
                                          "Tanh", "HardSwish", "HardSigmoid")}
#: stochastic depth (identity in eval mode)
DROP_PATH = _classes("timm.layers", "DropPath")
#: normalisation fused with an activation
NORM_ACT = _classes("timm.layers.norm_act", "BatchNormAct2d")
#: normalisation by the input's own statistics
NORMALIZATION = _classes("timm.layers.norm", "LayerNorm", "LayerNorm2d", "RmsNorm", "RmsNorm2d", "GroupNorm",
                         "GroupNorm1", "SimpleNorm")
#: LayerNorms over the channels of (N, C, H, W) tensors, and over the last dim (as nn.LayerNorm)
CHANNELS_FIRST_LAYER_NORMS = _classes("timm.layers.norm", "LayerNorm2d")
CHANNELS_LAST_LAYER_NORMS = (nn.LayerNorm, *_classes("timm.layers.norm", "LayerNorm"))
#: modules that commute with scaling their input by a positive number (pooling, stochastic depth)
SCALE_FREE = DROP_PATH + _classes("timm.layers", "SelectAdaptivePool2d", "MaxPool2dSame", "AvgPool2dSame",
                                  "BlurPool2d")


def notrace_modules() -> set[type[nn.Module]]:
    """Modules timm marks as leaves for symbolic tracing."""
    return set(timm_fx.get_notrace_modules())


def notrace_functions() -> tuple:
    """Functions timm marks as leaves for symbolic tracing."""
    return tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
