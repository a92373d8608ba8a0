"""Orthogonal-by-construction layers: the skew-orthogonal convolution (SOC) and projection pooling.

SOC's truncated exponential series is only approximately orthogonal; its constant is proven from
the exact skew-adjoint structure and a sound bound on ``||A||`` (see
:func:`certify_fx.nn.soc.truncated_exp_norm_bound`), never from the power-iteration correction
the paper uses.
"""

from __future__ import annotations

import torch

from ... import nn as cnn
from ...nn.soc import truncated_exp_norm_bound
from ..norms import SAFETY
from ..operators import Conv2d, materialized_bound
from ..registry import register_module_rule

#: Skew convolutions with at most this many input entries are materialised (exact norm).
MATERIALIZE_LIMIT = 2048


@register_module_rule(cnn.SOC)
def soc_module(ev, module, input):
    channels, height, width = input.shape
    s = module.stride
    if height % s or width % s or channels * s * s > module.channels:
        ev.fail(f"SOC with stride {s} needs a height and width divisible by {s} and at most "
                f"{module.channels // (s * s)} input channels, got {tuple(input.shape)}")
    with torch.no_grad():
        kernel = module.skew_kernel().detach().to(torch.float64)
    p = module.kernel_size // 2
    skew = Conv2d((module.channels, height // s, width // s), kernel, (1, 1), (p, p, p, p), (1, 1), 1)
    small = module.channels * (height // s) * (width // s) <= MATERIALIZE_LIMIT
    norm_a = materialized_bound(skew) if small else skew.upper_bound()
    if not norm_a.sound:
        ev.fail("no proven bound on the skew convolution's norm")
    # SAFETY: the layer runs in floating point, a hair away from the exact polynomial
    constant = truncated_exp_norm_bound(norm_a.value, module.terms) * (1 + SAFETY)
    return ev.nonlinear(input, constant, what=f"SOC p_{module.terms}(A), ||A|| <= {norm_a.value:.4g}")


@register_module_rule(cnn.ProjectionPool2d)
def projection_pool_module(ev, module, input):
    # a signed distance to a curve per disjoint channel pair: 1-Lipschitz (see the class docstring)
    if len(input.shape) != 3 or input.shape[0] != module.channels:
        ev.fail(f"ProjectionPool2d({module.channels}) needs (batch, {module.channels}, H, W) inputs, "
                f"got {tuple(input.shape)}")
    return ev.nonlinear(input, 1.0, what="projection pooling (signed distance)")
