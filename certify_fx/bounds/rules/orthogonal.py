"""Orthogonal-by-construction layers: the skew-orthogonal convolution (SOC), the block reflector
orthogonal convolution (BRO) and projection pooling.

SOC's truncated exponential series is only approximately orthogonal; its constant is proven from
the exact skew-adjoint structure and a sound bound on ``||A||`` (see
:func:`certify_fx.nn.soc.truncated_exp_norm_bound`), never from the power-iteration correction
the paper uses.
"""

from __future__ import annotations

import math

from ... import nn as cnn
from ...nn.soc import truncated_exp_norm_bound
from ..norms import SAFETY
from ..operators import Conv2d, FourierConv2d
from ..registry import register_module_rule
from ..values import Lipschitz


@register_module_rule(cnn.SOC)
def soc_module(ev, module, input):
    channels, height, width = input.shape
    s = module.stride
    if height % s or width % s or channels * s * s > module.channels:
        ev.fail(f"SOC with stride {s} needs a height and width divisible by {s} and at most "
                f"{module.channels // (s * s)} input channels, got {tuple(input.shape)}")
    p = module.kernel_size // 2
    skew = Conv2d((module.channels, height // s, width // s), module.skew_kernel().detach(), (1, 1), (p, p, p, p),
                  (1, 1), 1)
    norm_a = ev.operator_norm(skew)  # ||A||: the compiler's own policy (exact when small), or estimated in training
    terms = module.terms
    estimate = float(norm_a.estimate)
    # SAFETY: the layer runs in floating point, a hair away from the exact polynomial
    constant = Lipschitz(truncated_exp_norm_bound(norm_a.bound, terms) * (1 + SAFETY),
                         truncated_exp_norm_bound(estimate, terms) if math.isfinite(estimate) else math.nan,
                         norm_a.sound, norm_a.method)
    # the zero channel padding and space-to-depth around p(A) are isometries: the constant bounds the whole map
    return ev.nonlinear(input, constant, what=f"SOC p_{terms}(A), ||A|| <= {norm_a.bound:.4g}", whole_map=True)


@register_module_rule(cnn.BRO)
def bro_module(ev, module, input):
    # the response the forward computes, bounded per frequency: orthogonality is never assumed
    if len(input.shape) != 3 or input.shape[0] != module.channels:
        ev.fail(f"BRO({module.channels}) needs (batch, {module.channels}, H, W) inputs, got {tuple(input.shape)}")
    p = module.padding
    response = module.frequency_response(input.shape[1] + 2 * p, input.shape[2] + 2 * p)
    return ev.linear(input, FourierConv2d(input.shape, response, p))


@register_module_rule(cnn.ProjectionPool2d)
def projection_pool_module(ev, module, input):
    # a signed distance to a curve per disjoint channel pair: 1-Lipschitz (see the class docstring)
    if len(input.shape) != 3 or input.shape[0] != module.channels:
        ev.fail(f"ProjectionPool2d({module.channels}) needs (batch, {module.channels}, H, W) inputs, "
                f"got {tuple(input.shape)}")
    return ev.nonlinear(input, 1.0, what="projection pooling (signed distance)")
