"""Pooling, resampling and reductions.

Max pooling is 1-Lipschitz per window, so ``sqrt`` of the largest number of windows covering one
input; average pooling and means are depthwise convolutions or reductions with exact norms;
nearest and (bi)linear resampling are nonnegative linear maps bounded by the Schur test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import constants as C
from ..operators import Conv2d, Reduce
from ..registry import register_module_rule, register_rule
from ..values import Refused, TupleResult
from .common import feature_dims, int_tuple
from .shape import nonnegative_map

_INDICES = Refused("the indices returned by max pooling are not a continuous function of the input",
                   "use return_indices=False")


def _check_spatial(ev, x, what: str) -> None:
    if len(x.shape) != 3:
        ev.fail(f"{what} on (batch, C, H, W) inputs only; got a {len(x.shape) + 1}-d input")


def _max_pool(ev, x, kernel_size, stride, padding, dilation, return_indices):
    _check_spatial(ev, x, "max pooling")
    in_hw, out_hw = x.shape[-2:], ev.shape(part=0 if return_indices else None)[-2:]
    constant = C.max_pool_constant(in_hw, out_hw, kernel_size, stride, padding, dilation)
    part = 0 if return_indices else None
    y = ev.nonlinear(x, constant, f"max_pool k{kernel_size} s{stride} (x{constant:.3g})", part=part,
                     whole_map=True)  # the constant is sqrt(the most windows one input is in)
    return TupleResult((y, _INDICES), ("values", "indices")) if return_indices else y


@register_rule(F.max_pool2d, torch.max_pool2d)
def max_pool2d(ev, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return _max_pool(ev, input, kernel_size, stride, padding, dilation, return_indices)


@register_rule(F.max_pool2d_with_indices)
def max_pool2d_with_indices(ev, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=True):
    return _max_pool(ev, input, kernel_size, stride, padding, dilation, True)


@register_module_rule(nn.MaxPool2d)
def max_pool2d_module(ev, module, input):
    return _max_pool(ev, input, module.kernel_size, module.stride, module.padding, module.dilation,
                     module.return_indices)


def _adaptive_max_pool(ev, x, return_indices):
    part = 0 if return_indices else None
    _check_spatial(ev, x, "adaptive max pooling")
    in_hw, out_hw = x.shape[-2:], ev.shape(part=part)[-2:]
    y = ev.nonlinear(x, C.adaptive_max_pool_constant(in_hw, out_hw), part=part, whole_map=True)
    return TupleResult((y, _INDICES), ("values", "indices")) if return_indices else y


@register_rule(F.adaptive_max_pool2d)
def adaptive_max_pool2d(ev, input, output_size, return_indices=False):
    return _adaptive_max_pool(ev, input, return_indices)


@register_rule(F.adaptive_max_pool2d_with_indices)
def adaptive_max_pool2d_with_indices(ev, input, output_size, return_indices=True):
    return _adaptive_max_pool(ev, input, True)


@register_module_rule(nn.AdaptiveMaxPool2d)
def adaptive_max_pool2d_module(ev, module, input):
    return _adaptive_max_pool(ev, input, module.return_indices)


def _avg_pool(ev, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    _check_spatial(ev, x, "average pooling")
    k, s, p = int_tuple(kernel, 2), int_tuple(stride if stride else kernel, 2), int_tuple(padding, 2)
    c = x.shape[0]
    weight = torch.ones(c, 1, *k, dtype=ev.dtype) / (divisor or k[0] * k[1])
    conv = Conv2d(x.shape, weight, s, (p[0], p[0], p[1], p[1]), (1, 1), c)
    if conv.out_shape != ev.shape():
        ev.fail("average pooling with ceil_mode windows past the border is not supported", "use ceil_mode=False")
    if any(p) and not count_include_pad:
        ev.fail("average pooling with count_include_pad=False is not supported", "use count_include_pad=True")
    return ev.linear(x, conv)


@register_rule(F.avg_pool2d, torch._C._nn.avg_pool2d)
def avg_pool2d(ev, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return _avg_pool(ev, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@register_module_rule(nn.AvgPool2d, kind="linear")
def avg_pool2d_module(ev, module, input):
    return _avg_pool(ev, input, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                     module.count_include_pad, module.divisor_override)


def _adaptive_avg_pool(ev, x):
    _check_spatial(ev, x, "adaptive average pooling")
    (h, w), (oh, ow) = x.shape[-2:], ev.shape()[-2:]
    c = x.shape[0]
    if h % oh or w % ow:
        # unequal windows: still averages with nonnegative weights
        size = (oh, ow)
        return nonnegative_map(ev, x, lambda t: F.adaptive_avg_pool2d(t, size), f"adaptive_avg_pool {size}")
    kernel = (h // oh, w // ow)
    weight = torch.ones(c, 1, *kernel, dtype=ev.dtype) / (kernel[0] * kernel[1])
    return ev.linear(x, Conv2d(x.shape, weight, kernel, (0, 0, 0, 0), (1, 1), c))


@register_rule(F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)
def adaptive_avg_pool2d(ev, input, output_size):
    return _adaptive_avg_pool(ev, input)


@register_module_rule(nn.AdaptiveAvgPool2d)
def adaptive_avg_pool2d_module(ev, module, input):
    return _adaptive_avg_pool(ev, input)


_NONNEGATIVE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")


def _interpolate(ev, x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias):
    if mode not in _NONNEGATIVE_MODES:
        ev.fail(f"interpolation mode {mode!r} has negative weights; no exact rule",
                f"use one of {', '.join(_NONNEGATIVE_MODES)}")

    def resample(t):
        return F.interpolate(t, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)

    return nonnegative_map(ev, x, resample, f"interpolate {mode}")


@register_rule(F.interpolate, F.upsample)
def interpolate(ev, input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                recompute_scale_factor=None, antialias=False):
    return _interpolate(ev, input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)


@register_module_rule(nn.Upsample)
def upsample_module(ev, module, input):
    return _interpolate(ev, input, module.size, module.scale_factor, module.mode, module.align_corners,
                        module.recompute_scale_factor, False)


@register_rule(F.unfold)
def unfold(ev, input, kernel_size, dilation=1, padding=0, stride=1):
    # im2col copies each output from one input entry (or a zero pad)
    return nonnegative_map(ev, input, lambda t: F.unfold(t, kernel_size, dilation, padding, stride), "unfold")


@register_rule(torch.mean, "mean", torch.sum, "sum")
def reduce(ev, input, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        ev.fail(f"a reduction with dtype={dtype} casts; the bound assumes float32/float64", "drop dtype=")
    dims = feature_dims(ev, dim, len(input.shape) + 1, "a sum/mean")
    count = math.prod(input.shape[d] for d in dims)
    scale = 1.0 / count if ev.node.target in (torch.mean, "mean") else 1.0
    return ev.linear(input, Reduce(input.shape, ev.shape(), dims, scale))
