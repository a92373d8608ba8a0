"""Linear maps: arithmetic with constants, dense and convolutional layers (and their transposes).

Each rule returns the operator it applies (``ev.linear``); the compiler folds chains and sums of
them exactly and bounds them only where a nonlinearity or the output consumes them. A constant
added to an input-dependent value changes no Lipschitz constant; a product or quotient of two
input-dependent values is refused.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ... import nn as cnn
from ...errors import NotLipschitzError
from ..operators import Conv2d, Dense, Permute, Reshape, Scale, TransposedConv2d, add
from ..registry import register_module_rule, register_rule
from ..values import Tracked, TupleResult
from .common import FIX_ATTENTION, FIX_PRODUCT, broadcast, int_tuple, multiplier, number


def _scaled(ev, value, factor):
    factor = number(factor)
    return value if factor == 1 else ev.linear(value, Scale(value.shape, torch.tensor(factor, dtype=ev.dtype)))


def _sum(ev, a, b):
    """``a + b`` where either may be a constant (which only shifts the result)."""
    shape = ev.shape()
    if not isinstance(b, Tracked):
        return broadcast(ev, a, shape)
    if not isinstance(a, Tracked):
        return broadcast(ev, b, shape)
    a, b = broadcast(ev, a, shape), broadcast(ev, b, shape)
    form = dict(a.form)
    for source, op in b.form.items():
        form[source] = add(form[source], op) if source in form else op
    return Tracked(shape, form)


def _check_alpha(ev, alpha):
    if isinstance(alpha, torch.Tensor) or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        ev.fail(f"alpha={alpha!r} is not supported (a number is)")
    return alpha


@register_rule(operator.add, torch.add, "add", "__add__", "__radd__", inputs=("input", "other"))
def add_(ev, input, other, *, alpha=1):
    """``input + alpha * other`` (or the concatenation of two tuples of results)."""
    if isinstance(input, (tuple, list)) and isinstance(other, (tuple, list)) and alpha == 1:
        return TupleResult(tuple(input) + tuple(other))
    alpha = _check_alpha(ev, alpha)
    return _sum(ev, input, _scaled(ev, other, alpha) if isinstance(other, Tracked) else other)


@register_rule(operator.sub, torch.sub, torch.subtract, "sub", "subtract", "__sub__", inputs=("input", "other"))
def sub(ev, input, other, *, alpha=1):
    """``input - alpha * other``."""
    alpha = _check_alpha(ev, alpha)
    return _sum(ev, input, _scaled(ev, other, -alpha) if isinstance(other, Tracked) else other)


@register_rule(torch.rsub, "__rsub__", inputs=("input", "other"))
def rsub(ev, input, other, *, alpha=1):
    """``other - alpha * input``."""
    alpha = _check_alpha(ev, alpha)
    return _sum(ev, other, _scaled(ev, input, -alpha) if isinstance(input, Tracked) else input)


@register_rule(operator.neg, torch.neg, torch.negative, "neg", "negative", "__neg__")
def neg(ev, input):
    return _scaled(ev, input, -1.0)


@register_rule(operator.pos, torch.positive, "__pos__", "positive", may_alias=True)
def pos(ev, input):
    return input


@register_rule(operator.mul, torch.mul, torch.multiply, "mul", "multiply", "__mul__", "__rmul__",
               inputs=("input", "other"))
def mul(ev, input, other):
    if isinstance(input, (tuple, list)) and isinstance(other, int):  # repeating a tuple of results
        return TupleResult(tuple(input) * other)
    if isinstance(input, Tracked) and isinstance(other, Tracked):
        ev.fail("the product of two input-dependent tensors is not globally Lipschitz", FIX_PRODUCT, NotLipschitzError)
    tracked, const = (input, other) if isinstance(input, Tracked) else (other, input)
    tracked = broadcast(ev, tracked, ev.shape())
    return ev.linear(tracked, Scale(tracked.shape, multiplier(ev, const)))


@register_rule(torch.addcmul, "addcmul", inputs=("input", "tensor1", "tensor2"))
def addcmul(ev, input, tensor1, tensor2, *, value=1):
    """``input + value * tensor1 * tensor2`` with at most one input-dependent factor (timm's ResMLP
    ``Affine`` is ``addcmul(beta, alpha, x)``)."""
    if isinstance(tensor1, Tracked) and isinstance(tensor2, Tracked):
        ev.fail("the product of two input-dependent tensors is not globally Lipschitz", FIX_PRODUCT, NotLipschitzError)
    if not isinstance(tensor1, Tracked) and not isinstance(tensor2, Tracked):
        return broadcast(ev, input, ev.shape())
    tracked, const = (tensor1, tensor2) if isinstance(tensor1, Tracked) else (tensor2, tensor1)
    tracked = broadcast(ev, tracked, ev.shape())
    product = ev.linear(tracked, Scale(tracked.shape, multiplier(ev, const) * number(value)))
    return _sum(ev, input, product)


@register_rule(operator.truediv, torch.div, torch.divide, torch.true_divide, "div", "divide", "true_divide",
               "__truediv__")
def div(ev, input, other, *, rounding_mode=None):
    if rounding_mode is not None:
        ev.fail(f"division with rounding_mode={rounding_mode!r} is not continuous")
    factor = multiplier(ev, other)
    if not bool((factor != 0).all()):
        ev.fail("division by a constant that contains zeros")
    a = broadcast(ev, input, ev.shape())
    return ev.linear(a, Scale(a.shape, 1.0 / factor))


@register_rule(operator.matmul, torch.matmul, torch.mm, "matmul", "mm", "__matmul__", inputs=("input", "other"))
def matmul(ev, input, other):
    if isinstance(input, Tracked) and isinstance(other, Tracked):
        ev.fail("the product of two input-dependent tensors (e.g. attention scores q @ k^T) is not globally "
                "Lipschitz", FIX_ATTENTION, NotLipschitzError)
    if isinstance(input, Tracked) and isinstance(other, torch.Tensor) and other.dim() == 2 and len(input.shape) >= 1:
        return ev.linear(input, Dense(input.shape, other.T))
    if isinstance(other, Tracked) and isinstance(input, torch.Tensor) and input.dim() == 2 and len(other.shape) >= 2:
        # W @ x mixes the rows of x: (x^T W^T)^T, with the last two dims swapped around a dense map
        swap = tuple(range(len(other.shape) - 2)) + (len(other.shape) - 1, len(other.shape) - 2)
        rows = ev.linear(other, Permute(other.shape, swap))
        mixed = ev.linear(rows, Dense(rows.shape, input))
        return ev.linear(mixed, Permute(mixed.shape, swap))
    ev.fail("only `input @ W` and `W @ input` with a constant 2-d W are supported")


def _dense(ev, input, weight):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not input.shape:
        ev.fail("a linear layer needs a 2-d weight and an input with a feature dimension")
    return ev.linear(input, Dense(input.shape, weight))


@register_rule(F.linear)
def linear(ev, input, weight, bias=None):
    return _dense(ev, input, weight)


@register_module_rule(nn.Linear, kind="linear")
def linear_module(ev, module, input):
    return _dense(ev, input, module.weight)


@register_module_rule(cnn.LLNLinear)
def lln_module(ev, module, input):
    return _dense(ev, input, module.normalized_weight())


@register_module_rule(cnn.CholeskyLinear)
def cholesky_linear_module(ev, module, input):
    # the weight the forward computes, bounded exactly: orthogonality is never assumed
    return _dense(ev, input, module.orthogonal_weight())


# -- convolutions ----------------------------------------------------------------------------


def _conv_padding(ev, padding, kernel, dilation, n: int) -> tuple[int, ...]:
    """(top, bottom, left, right) for 2-d, or (left, right) for 1-d."""
    if padding == "valid":
        return (0,) * (2 * n)
    if padding == "same":
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if isinstance(padding, str):
        ev.fail(f"padding={padding!r} is not supported")
    return tuple(p for p in int_tuple(padding, n) for _ in (0, 1))


def _conv2d(ev, x, weight, stride, padding, dilation, groups):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        ev.fail("conv2d needs a constant 4-d weight")
    if len(x.shape) != 3:
        ev.fail(f"conv2d on an unbatched or {len(x.shape) + 1}-d input is not supported")
    stride, dilation = int_tuple(stride, 2), int_tuple(dilation, 2)
    pads = _conv_padding(ev, padding, tuple(weight.shape[-2:]), dilation, 2)
    return ev.linear(x, Conv2d(x.shape, weight, stride, pads, dilation, int(groups)))


def _conv1d(ev, x, weight, stride, padding, dilation, groups):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or len(x.shape) != 2:
        ev.fail("conv1d needs a constant 3-d weight and (batch, channels, length) inputs")
    (k,), (d,) = tuple(weight.shape[-1:]), int_tuple(dilation, 1)
    left, right = _conv_padding(ev, padding, (k,), (d,), 1)
    c, length = x.shape
    as_2d = ev.linear(x, Reshape(x.shape, (c, 1, length)))
    conv = Conv2d(as_2d.shape, weight.unsqueeze(2), (1, int_tuple(stride, 1)[0]), (0, 0, left, right), (1, d),
                  int(groups))
    y = ev.linear(as_2d, conv)
    return ev.linear(y, Reshape(y.shape, (y.shape[0], y.shape[2])))


def _check_zero_padding(ev, module):
    if module.padding_mode != "zeros":
        ev.fail(f"padding_mode={module.padding_mode!r} is not supported (only zero padding)", "use padding_mode='zeros'")


def _conv(ev, x, weight, stride, padding, dilation, groups):
    if isinstance(weight, torch.Tensor) and weight.dim() == 3:
        return _conv1d(ev, x, weight, stride, padding, dilation, groups)
    return _conv2d(ev, x, weight, stride, padding, dilation, groups)


@register_rule(F.conv2d, torch.conv2d, F.conv1d, torch.conv1d)
def conv(ev, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(ev, input, weight, stride, padding, dilation, groups)


@register_module_rule(nn.Conv1d, nn.Conv2d, kind="linear")
def conv_module(ev, module, input):
    _check_zero_padding(ev, module)
    return _conv(ev, input, module.weight, module.stride, module.padding, module.dilation, module.groups)


@register_module_rule(cnn.CholeskyConv2d)
def cholesky_conv_module(ev, module, input):
    k = module.patch_size
    return _conv2d(ev, input, module.orthogonal_weight(), k, 0, 1, 1)


def _conv_transpose2d(ev, x, weight, stride, padding, output_padding, groups, dilation):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or len(x.shape) != 3:
        ev.fail("conv_transpose2d needs a constant 4-d weight and (batch, C, H, W) inputs")
    out = ev.shape()
    stride, dilation, (ph, pw) = int_tuple(stride, 2), int_tuple(dilation, 2), int_tuple(padding, 2)
    # the adjoint of conv2d(., weight) from the output's shape (output_padding is in `out`)
    conv = Conv2d(out, weight, stride, (ph, ph, pw, pw), dilation, int(groups))
    if conv.out_shape != x.shape:
        ev.fail(f"conv_transpose2d shapes do not match the adjoint convolution ({conv.out_shape} vs {x.shape})")
    return ev.linear(x, TransposedConv2d(conv))


@register_rule(F.conv_transpose2d, torch.conv_transpose2d)
def conv_transpose2d(ev, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _conv_transpose2d(ev, input, weight, stride, padding, output_padding, groups, dilation)


@register_module_rule(nn.ConvTranspose2d, kind="linear")
def conv_transpose2d_module(ev, module, input, output_size=None):
    _check_zero_padding(ev, module)
    return _conv_transpose2d(ev, input, module.weight, module.stride, module.padding, module.output_padding,
                             module.groups, module.dilation)


@register_module_rule(cnn.TokenMixing, kind="linear")
def token_mixing_module(ev, module, input):
    if len(input.shape) != 2:
        ev.fail("TokenMixing expects (batch, tokens, channels) inputs")
    swapped = ev.linear(input, Permute(input.shape, (1, 0)))
    mixed = ev.linear(swapped, Dense(swapped.shape, module.weight))
    return ev.linear(mixed, Permute(mixed.shape, (1, 0)))


def _same_padding_conv(ev, conv, what: str) -> int:
    """Check that ``conv`` is a plain ``nn.Conv2d`` computing a stride-1 "same" zero-padded
    convolution, the only map a folded-kernel rule reproduces; returns its padding."""
    if type(conv) is not nn.Conv2d:
        ev.fail(f"{what} holds a {type(conv).__qualname__}, not an nn.Conv2d; its rule bounds nn.Conv2d only",
                "use nn.Conv2d in the block, or write the block as separate modules so each part is bounded")
    k = conv.kernel_size
    same = (k[0] // 2, k[1] // 2)
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    actual = {"padding_mode": conv.padding_mode, "stride": tuple(conv.stride), "dilation": tuple(conv.dilation),
              "groups": conv.groups, "padding": same if padding == "same" else padding}
    expected = {"padding_mode": "zeros", "stride": (1, 1), "dilation": (1, 1), "groups": 1, "padding": same}
    changed = {name: value for name, value in actual.items() if value != expected[name]}
    if changed or k[0] != k[1] or k[0] % 2 == 0 or conv.in_channels != conv.out_channels:
        detail = ", ".join(f"{n}={v!r}" for n, v in changed.items()) or f"kernel_size={k}"
        ev.fail(f"{what}'s conv has {detail}; the block's rule covers square odd kernels with stride 1, dilation "
                "1, groups 1 and zero 'same' padding only", "write the block as separate modules")
    return k[0] // 2


@register_module_rule(cnn.LiResNetBlock)
def liresnet_block_module(ev, module, input):
    k = _same_padding_conv(ev, module.conv, "LiResNetBlock")
    channels = module.conv.out_channels
    if tuple(module.beta.shape) != (channels,) or not isinstance(module.scale, (int, float)):
        ev.fail(f"LiResNetBlock's beta has shape {tuple(module.beta.shape)} and scale {module.scale!r}; expected "
                f"({channels},) and a number")
    return ev.linear(input, Conv2d(input.shape, module.folded_weight(), (1, 1), (k, k, k, k)))


@register_module_rule(cnn.LinearBottleneck)
def linear_bottleneck_module(ev, module, input):
    """``shortcut(x) + convs(x)``: the shortcut (identity when None) and each conv of the branch
    through its own rule (the rule table decides what a conv, a transposed conv or anything else
    is); the compiler folds the chain exactly where it can, then the shortcut joins the composed
    kernel (one conv, bounded exactly)."""
    if type(module.branch) is not nn.Sequential:
        ev.fail(f"LinearBottleneck's branch is a {type(module.branch).__qualname__}, not an nn.Sequential",
                "keep the branch an nn.Sequential of convolutions")
    branch = input
    for part in module.branch:
        branch = ev.apply_module(part, branch)
    shortcut = input if module.shortcut is None else ev.apply_module(module.shortcut, input)
    return _sum(ev, shortcut, branch)
