"""The rule table of the bound compiler: what each operation does to a Lipschitz bound.

A rule receives the :class:`~.compiler.Evaluator`, the fx node and its evaluated arguments, and
returns a :class:`~.compiler.Tracked` value. Linear operations return the operator they apply
(folded later); nonlinear ones return their global Lipschitz constant; operations that are not
globally Lipschitz raise :class:`~certify_fx.errors.NotLipschitzError` naming the fix.

Extend it with :func:`register_module_rule` and :func:`register_function_rule`.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import nn as cnn
from ..errors import NotLipschitzError
from . import constants as C
from .compiler import Evaluator, Tracked
from .operators import (
    Concat, Conv2d, Dense, Expand, LinearOperator, Pad, Permute, Reduce, Reshape, Scale, Select, add,
)

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "register_module_rule", "register_function_rule",
           "module_rule"]

Rule = Callable[..., Any]
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}
MODULE_RULES: dict[type, Rule] = {}

FIX_NORMALIZATION = (
    "replace it with a learnable per-channel Affine (pass `remove_normalization`, or "
    "`certify_fx.convert(model, to='lipschitz-vit')` for ViTs)"
)
FIX_ATTENTION = (
    "replace dot-product attention with spatial-MLP token mixing (pass `attention_to_spatial_mlp`, "
    "or `certify_fx.convert(model, to='lipschitz-vit')`)"
)
FIX_PRODUCT = (
    "remove the gate, or convert the model with `certify_fx.convert(model, to='liresnet')` "
    "(pass `linearize_residual_branches`)"
)


def register_module_rule(*types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Register ``rule(ev, node, module, args, kwargs)`` for modules of exactly these types."""

    def deco(rule: Rule) -> Rule:
        for t in types:
            MODULE_RULES[t] = rule
        return rule

    return deco


def register_function_rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register ``rule(ev, node, args, kwargs)`` for functions (callables) or Tensor methods (str)."""

    def deco(rule: Rule) -> Rule:
        for t in targets:
            (METHOD_RULES if isinstance(t, str) else FUNCTION_RULES)[t] = rule
        return rule

    return deco


def module_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``: its own type's, or a base class's if the subclass keeps its forward."""
    for cls in type(module).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            # A subclass that overrides forward may compute something else (e.g. BatchNorm + act).
            return rule if type(module).forward is cls.forward else None
    return None


def _arg(args, kwargs, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _arg_node(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return first if isinstance(first, fx.Node) else None


# -----------------------------------------------------------------------------------------------
# Activations and other nonlinear maps


def _activation(constant: Callable[..., float]) -> Rule:
    def rule(ev: Evaluator, node: fx.Node, args, kwargs) -> Tracked:
        value = args[0]
        if not isinstance(value, Tracked):
            ev.fail("only the first argument of an activation may depend on the input")
        return ev.nonlinear(value, constant(ev, *args[1:], **kwargs), _arg_node(node))

    return rule


def _module_activation(constant: Callable[..., float]) -> Rule:
    def rule(ev: Evaluator, node: fx.Node, module: nn.Module, args, kwargs) -> Tracked:
        return ev.nonlinear(args[0], constant(module), _arg_node(node))

    return rule


def _one(*_, **__) -> float:
    return 1.0


def _leaky(ev, negative_slope=0.01, *_, **kw) -> float:
    return max(1.0, abs(kw.get("negative_slope", negative_slope)))


def _elu(ev, alpha=1.0, *_, **kw) -> float:
    return max(1.0, abs(kw.get("alpha", alpha)))


def _gelu(ev, *args, approximate: str = "none", **kw) -> float:
    return C.GELU_TANH if approximate == "tanh" else C.GELU


ONE_LIPSCHITZ_FUNCTIONS = [
    F.relu, torch.relu, F.relu6, F.hardtanh, torch.tanh, F.tanh, torch.abs, F.softsign, F.softplus,
    torch.clamp, torch.clip, F.softmax, torch.softmax, F.celu,
]
for _fn in ONE_LIPSCHITZ_FUNCTIONS:
    FUNCTION_RULES[_fn] = _activation(_one)
for _name in ["relu", "relu_", "tanh", "tanh_", "abs", "abs_", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
              "softmax"]:
    METHOD_RULES[_name] = _activation(_one)
FUNCTION_RULES[F.leaky_relu] = _activation(_leaky)
FUNCTION_RULES[F.elu] = _activation(_elu)
FUNCTION_RULES[F.selu] = FUNCTION_RULES[torch.selu] = _activation(lambda ev, *a, **k: C.SELU)
FUNCTION_RULES[F.gelu] = _activation(_gelu)
FUNCTION_RULES[F.silu] = _activation(lambda ev, *a, **k: C.SILU)
FUNCTION_RULES[F.mish] = _activation(lambda ev, *a, **k: C.MISH)
FUNCTION_RULES[F.hardswish] = _activation(lambda ev, *a, **k: C.HARDSWISH)
FUNCTION_RULES[F.hardsigmoid] = _activation(lambda ev, *a, **k: C.HARDSIGMOID)
for _fn in (torch.sigmoid, F.sigmoid):
    FUNCTION_RULES[_fn] = _activation(lambda ev, *a, **k: C.SIGMOID)
METHOD_RULES["sigmoid"] = METHOD_RULES["sigmoid_"] = _activation(lambda ev, *a, **k: C.SIGMOID)

MODULE_ACTIVATIONS: dict[type, Callable[[nn.Module], float]] = {
    nn.ReLU: _one, nn.ReLU6: _one, nn.Hardtanh: _one, nn.Tanh: _one, nn.Softsign: _one, nn.Softplus: _one,
    nn.Softmax: _one, nn.CELU: _one, cnn.GroupSort: _one, cnn.MinMax: _one,
    nn.LeakyReLU: lambda m: max(1.0, abs(m.negative_slope)),
    nn.ELU: lambda m: max(1.0, abs(m.alpha)),
    nn.SELU: lambda m: C.SELU,
    nn.PReLU: lambda m: max(1.0, float(m.weight.detach().abs().max())),
    nn.GELU: lambda m: C.GELU_TANH if m.approximate == "tanh" else C.GELU,
    nn.SiLU: lambda m: C.SILU,
    nn.Mish: lambda m: C.MISH,
    nn.Sigmoid: lambda m: C.SIGMOID,
    nn.Hardswish: lambda m: C.HARDSWISH,
    nn.Hardsigmoid: lambda m: C.HARDSIGMOID,
}


def _add_timm_activations() -> None:
    try:
        from timm.layers import activations as ta
    except ImportError:
        return
    table = {"GELU": C.GELU, "GELUTanh": C.GELU_TANH, "Swish": C.SILU, "Mish": C.MISH, "Sigmoid": C.SIGMOID,
             "Tanh": 1.0, "HardSwish": C.HARDSWISH, "HardSigmoid": C.HARDSIGMOID, "HardMish": None}
    for name, value in table.items():
        cls = getattr(ta, name, None)
        if cls is not None and value is not None:
            MODULE_ACTIVATIONS[cls] = lambda m, v=value: v


_add_timm_activations()
for _cls, _constant in MODULE_ACTIVATIONS.items():
    MODULE_RULES[_cls] = _module_activation(_constant)


def _pool_hw(ev: Evaluator, node: fx.Node) -> tuple[tuple[int, int], tuple[int, int]]:
    arg = _arg_node(node)
    return ev.shape(arg)[-2:], ev.shape()[-2:]


def _max_pool(ev: Evaluator, node: fx.Node, value, kernel, stride, padding, dilation, ceil_mode, return_indices):
    if return_indices:
        ev.fail("max pooling that returns indices is not supported")
    in_hw, out_hw = _pool_hw(ev, node)
    constant = C.max_pool_constant(in_hw, out_hw, kernel, stride, padding, dilation)
    return ev.nonlinear(value, constant, _arg_node(node), f"max_pool k{kernel} s{stride} (x{constant:.3g})")


@register_module_rule(nn.MaxPool2d)
def _max_pool_module(ev, node, m: nn.MaxPool2d, args, kwargs):
    return _max_pool(ev, node, args[0], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


@register_function_rule(F.max_pool2d)
def _max_pool_function(ev, node, args, kwargs):
    names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    defaults = [None, None, None, 0, 1, False, False]
    vals = [_arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    return _max_pool(ev, node, *vals)


@register_module_rule(nn.AdaptiveMaxPool2d)
def _adaptive_max_pool_module(ev, node, m, args, kwargs):
    if m.return_indices:
        ev.fail("max pooling that returns indices is not supported")
    in_hw, out_hw = _pool_hw(ev, node)
    return ev.nonlinear(args[0], C.adaptive_max_pool_constant(in_hw, out_hw), _arg_node(node))


@register_function_rule(F.adaptive_max_pool2d)
def _adaptive_max_pool_function(ev, node, args, kwargs):
    in_hw, out_hw = _pool_hw(ev, node)
    return ev.nonlinear(args[0], C.adaptive_max_pool_constant(in_hw, out_hw), _arg_node(node))


@register_function_rule(torch.amax, "amax")
def _amax(ev, node, args, kwargs):
    # each output is the max over its own disjoint set of inputs
    return ev.nonlinear(args[0], 1.0, _arg_node(node))


# -----------------------------------------------------------------------------------------------
# Not globally Lipschitz


def _not_lipschitz(reason: str, fix: str) -> Rule:
    def rule(ev: Evaluator, node: fx.Node, *rest) -> Tracked:
        ev.fail(reason, fix, NotLipschitzError)

    return rule


_LAYER_NORM = _not_lipschitz("normalisation by the input's own statistics is not globally Lipschitz", FIX_NORMALIZATION)
for _cls in (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm):
    MODULE_RULES[_cls] = _LAYER_NORM
for _fn in (F.layer_norm, F.group_norm, F.instance_norm, F.normalize, F.local_response_norm):
    FUNCTION_RULES[_fn] = _LAYER_NORM
_ATTENTION = _not_lipschitz("dot-product attention is not globally Lipschitz", FIX_ATTENTION)
MODULE_RULES[nn.MultiheadAttention] = _ATTENTION
FUNCTION_RULES[F.scaled_dot_product_attention] = _ATTENTION


def _add_timm_norms() -> None:
    try:
        from timm.layers import norm as tn
    except ImportError:
        return
    for name in ("LayerNorm", "LayerNorm2d", "RmsNorm", "RmsNorm2d", "GroupNorm", "GroupNorm1", "SimpleNorm"):
        cls = getattr(tn, name, None)
        if cls is not None:
            MODULE_RULES[cls] = _LAYER_NORM


_add_timm_norms()


# -----------------------------------------------------------------------------------------------
# Linear maps


def _identity_rule(ev, node, args, kwargs):
    return args[0]


for _name in ["contiguous", "clone", "float", "to", "type_as", "detach", "double", "half", "bfloat16"]:
    METHOD_RULES[_name] = _identity_rule
FUNCTION_RULES[torch.clone] = _identity_rule


@register_module_rule(nn.Identity)
def _identity_module(ev, node, m, args, kwargs):
    return args[0]


def _dropout_scale(ev: Evaluator, value: Tracked, p: float, training: bool) -> Tracked:
    if not training or p == 0:
        return value
    # In training mode every entry is scaled by 0 or 1/(1-p): a diagonal map of norm 1/(1-p).
    return ev.linear(value, Scale(value.shape, torch.tensor(1.0 / (1.0 - p), dtype=ev.dtype)))


@register_module_rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
def _dropout_module(ev, node, m, args, kwargs):
    if isinstance(m, nn.AlphaDropout) and m.training:
        ev.fail("AlphaDropout in training mode is not supported", "call model.eval()")
    return _dropout_scale(ev, args[0], m.p, m.training)


@register_function_rule(F.dropout, F.dropout1d, F.dropout2d)
def _dropout_function(ev, node, args, kwargs):
    return _dropout_scale(ev, args[0], _arg(args, kwargs, 1, "p", 0.5), _arg(args, kwargs, 2, "training", True))


def _broadcast(ev: Evaluator, value: Tracked, shape) -> Tracked:
    return value if value.shape == tuple(shape) else ev.linear(value, Expand(value.shape, tuple(shape)))


def _sum_forms(ev: Evaluator, a: Tracked, b: Tracked) -> Tracked:
    shape = ev.shape()
    a, b = _broadcast(ev, a, shape), _broadcast(ev, b, shape)
    form = dict(a.form)
    for source, op in b.form.items():
        form[source] = add(form[source], op) if source in form else op
    return Tracked(shape, form)


def _negate(ev: Evaluator, value: Tracked) -> Tracked:
    return ev.linear(value, Scale(value.shape, torch.tensor(-1.0, dtype=ev.dtype)))


def _multiplier(ev: Evaluator, const: Any) -> torch.Tensor:
    """A constant as a multiplier broadcastable to the current node's shape (batch removed)."""
    t = const if isinstance(const, torch.Tensor) else torch.tensor(float(const), dtype=ev.dtype)
    ndim = len(ev.shape()) + 1
    if t.dim() == ndim:
        if t.shape[0] != 1:
            ev.fail("multiplication by a constant that differs across the batch is not supported")
        t = t[0]
    return t


@register_function_rule(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__")
def _add_rule(ev, node, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    alpha = kwargs.get("alpha", 1)
    if isinstance(b, Tracked) and alpha != 1:
        b = ev.linear(b, Scale(b.shape, torch.tensor(float(alpha), dtype=ev.dtype)))
    if isinstance(a, Tracked) and isinstance(b, Tracked):
        return _sum_forms(ev, a, b)
    tracked = a if isinstance(a, Tracked) else b
    return _broadcast(ev, tracked, ev.shape())


@register_function_rule(operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__", "__rsub__")
def _sub_rule(ev, node, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if node.target == "__rsub__":
        a, b = b, a
    b = _negate(ev, b) if isinstance(b, Tracked) else b
    if isinstance(a, Tracked) and isinstance(b, Tracked):
        return _sum_forms(ev, a, b)
    return _broadcast(ev, a if isinstance(a, Tracked) else b, ev.shape())


@register_function_rule(operator.neg, torch.neg, "neg", "__neg__")
def _neg_rule(ev, node, args, kwargs):
    return _negate(ev, args[0])


@register_function_rule(operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__")
def _mul_rule(ev, node, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if isinstance(a, Tracked) and isinstance(b, Tracked):
        ev.fail("the product of two input-dependent tensors is not globally Lipschitz", FIX_PRODUCT, NotLipschitzError)
    tracked, const = (a, b) if isinstance(a, Tracked) else (b, a)
    tracked = _broadcast(ev, tracked, ev.shape())
    return ev.linear(tracked, Scale(tracked.shape, _multiplier(ev, const)))


@register_function_rule(operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_",
                        "__truediv__")
def _div_rule(ev, node, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if isinstance(b, Tracked):
        ev.fail("division by an input-dependent tensor is not globally Lipschitz", FIX_NORMALIZATION,
                NotLipschitzError)
    if kwargs.get("rounding_mode") is not None:
        ev.fail("rounded division is not Lipschitz")
    a = _broadcast(ev, a, ev.shape())
    return ev.linear(a, Scale(a.shape, 1.0 / _multiplier(ev, b)))


def _product_rule(ev, node, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if isinstance(a, Tracked) and isinstance(b, Tracked):
        ev.fail("the product of two input-dependent tensors (e.g. attention scores q @ k^T) is not globally "
                "Lipschitz", FIX_ATTENTION, NotLipschitzError)
    if isinstance(a, Tracked) and isinstance(b, torch.Tensor) and b.dim() == 2:
        return ev.linear(a, Dense(a.shape, b.T))
    ev.fail("only `input @ W` with a constant 2-D W is supported")


for _t in (operator.matmul, torch.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", "__matmul__"):
    (METHOD_RULES if isinstance(_t, str) else FUNCTION_RULES)[_t] = _product_rule


@register_function_rule(torch.einsum)
def _einsum_rule(ev, node, args, kwargs):
    if sum(isinstance(a, Tracked) for a in args[1:]) > 1:
        ev.fail("the product of two input-dependent tensors is not globally Lipschitz", FIX_ATTENTION,
                NotLipschitzError)
    ev.fail("einsum is not supported; use Linear/conv layers or matmul with a constant")


# -- dense and convolutional layers


@register_module_rule(nn.Linear)
def _linear_module(ev, node, m: nn.Linear, args, kwargs):
    return ev.linear(args[0], Dense(args[0].shape, m.weight))


@register_module_rule(cnn.LLNLinear)
def _lln_module(ev, node, m: cnn.LLNLinear, args, kwargs):
    return ev.linear(args[0], Dense(args[0].shape, m.normalized_weight()))


@register_function_rule(F.linear)
def _linear_function(ev, node, args, kwargs):
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    if isinstance(weight, Tracked):
        ev.fail("a linear layer whose weight depends on the input is not globally Lipschitz", FIX_ATTENTION,
                NotLipschitzError)
    return ev.linear(x, Dense(x.shape, weight))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_padding(padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


def _conv2d(ev: Evaluator, x: Tracked, weight, stride, padding, dilation, groups) -> Tracked:
    if isinstance(weight, Tracked):
        ev.fail("a convolution whose kernel depends on the input is not globally Lipschitz")
    if len(x.shape) != 3:
        ev.fail(f"conv2d on an unbatched or {len(x.shape) + 1}-d input is not supported")
    stride, dilation = _pair(stride), _pair(dilation)
    pads = _conv_padding(padding, tuple(weight.shape[-2:]), dilation)
    return ev.linear(x, Conv2d(x.shape, weight, stride, pads, dilation, groups))


@register_module_rule(nn.Conv2d)
def _conv2d_module(ev, node, m: nn.Conv2d, args, kwargs):
    if m.padding_mode != "zeros":
        ev.fail(f"padding_mode={m.padding_mode!r} is not supported (only zero padding)",
                "use padding_mode='zeros'")
    return _conv2d(ev, args[0], m.weight, m.stride, m.padding, m.dilation, m.groups)


@register_function_rule(F.conv2d, torch.conv2d)
def _conv2d_function(ev, node, args, kwargs):
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    defaults = [None, None, None, 1, 0, 1, 1]
    x, w, _, s, p, d, g = (_arg(args, kwargs, i, n, dv) for i, (n, dv) in enumerate(zip(names, defaults)))
    return _conv2d(ev, x, w, s, p, d, g)


@register_module_rule(nn.Conv1d)
def _conv1d_module(ev, node, m: nn.Conv1d, args, kwargs):
    x: Tracked = args[0]
    if m.padding_mode != "zeros" or len(x.shape) != 2:
        ev.fail("only zero-padded Conv1d on (batch, channels, length) inputs is supported")
    c, length = x.shape
    as_2d = ev.linear(x, Reshape(x.shape, (c, 1, length)))
    pads = (0, 0, *_conv_padding(m.padding, (1, m.kernel_size[0]), (1, m.dilation[0]))[2:])
    conv = Conv2d(as_2d.shape, m.weight.unsqueeze(2), (1, m.stride[0]), pads, (1, m.dilation[0]), m.groups)
    y = ev.linear(as_2d, conv)
    return ev.linear(y, Reshape(y.shape, ev.shape()))


@register_module_rule(cnn.TokenMixing)
def _token_mixing(ev, node, m: cnn.TokenMixing, args, kwargs):
    x: Tracked = args[0]
    if len(x.shape) != 2:
        ev.fail("TokenMixing expects (batch, tokens, channels) inputs")
    swap = Permute(x.shape, (1, 0))
    mixed = ev.linear(ev.linear(x, swap), Dense((x.shape[1], x.shape[0]), m.weight))
    return ev.linear(mixed, Permute(mixed.shape, (1, 0)))


@register_module_rule(cnn.LiResNetBlock)
def _liresnet_block(ev, node, m: cnn.LiResNetBlock, args, kwargs):
    k = m.conv.kernel_size[0] // 2
    return ev.linear(args[0], Conv2d(args[0].shape, m.folded_weight(), (1, 1), (k, k, k, k)))


# -- normalisation with fixed statistics


def _channel_scale(ev: Evaluator, x: Tracked, vector: torch.Tensor, dim: int = 0) -> Tracked:
    shape = [1] * len(x.shape)
    shape[dim] = -1
    return ev.linear(x, Scale(x.shape, vector.reshape(shape)))


def _batch_norm_scale(ev: Evaluator, m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    if m.training or m.running_var is None:
        ev.fail("BatchNorm normalises by batch statistics in training mode, which is not Lipschitz in one input",
                "call model.eval() so it uses running statistics (pass `fold_batchnorm` folds it), or "
                "`remove_normalization` for training", NotLipschitzError)
    scale = torch.rsqrt(m.running_var + m.eps)
    return scale * m.weight if m.weight is not None else scale


@register_module_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm_module(ev, node, m, args, kwargs):
    return _channel_scale(ev, args[0], _batch_norm_scale(ev, m))


@register_function_rule(F.batch_norm)
def _batch_norm_function(ev, node, args, kwargs):
    names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
    defaults = [None, None, None, None, None, False, 0.1, 1e-5]
    x, _, var, weight, _, training, _, eps = (_arg(args, kwargs, i, n, d) for i, (n, d) in
                                              enumerate(zip(names, defaults)))
    if training or var is None:
        ev.fail("BatchNorm in training mode is not Lipschitz in one input", "call model.eval()", NotLipschitzError)
    scale = torch.rsqrt(var + eps)
    return _channel_scale(ev, x, scale * weight if weight is not None else scale)


@register_module_rule(cnn.Affine)
def _affine_module(ev, node, m: cnn.Affine, args, kwargs):
    x = args[0]
    return _channel_scale(ev, x, m.weight, (m.dim % (len(x.shape) + 1)) - 1)


def _add_timm_norm_act() -> None:
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:
        return

    @register_module_rule(BatchNormAct2d)
    def _batch_norm_act(ev, node, m, args, kwargs):
        y = _channel_scale(ev, args[0], _batch_norm_scale(ev, m))
        y = _dropout_scale(ev, y, getattr(m.drop, "p", 0.0), m.training)
        act = module_rule(m.act)
        if act is None:
            ev.fail(f"no Lipschitz rule for the activation {type(m.act).__name__} inside BatchNormAct2d")
        return act(ev, node, m.act, (y,), {}) if not isinstance(m.act, nn.Identity) else y


_add_timm_norm_act()


# -- averaging


def _avg_pool(ev: Evaluator, x: Tracked, kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> Tracked:
    k, s, p = _pair(kernel), _pair(stride if stride else kernel), _pair(padding)
    c = x.shape[0]
    weight = torch.ones(c, 1, *k, dtype=ev.dtype) / (divisor or k[0] * k[1])
    conv = Conv2d(x.shape, weight, s, (p[0], p[0], p[1], p[1]), (1, 1), c)
    if conv.out_shape != ev.shape():
        ev.fail("average pooling with ceil_mode windows past the border is not supported", "use ceil_mode=False")
    if any(p) and not count_include_pad:
        ev.fail("average pooling with count_include_pad=False is not supported", "use count_include_pad=True")
    return ev.linear(x, conv)


@register_module_rule(nn.AvgPool2d)
def _avg_pool_module(ev, node, m: nn.AvgPool2d, args, kwargs):
    return _avg_pool(ev, args[0], m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                     m.divisor_override)


@register_function_rule(F.avg_pool2d)
def _avg_pool_function(ev, node, args, kwargs):
    names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
    defaults = [None, None, None, 0, False, True, None]
    return _avg_pool(ev, *(_arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))))


def _adaptive_avg_pool(ev: Evaluator, x: Tracked) -> Tracked:
    (c, h, w), (_, oh, ow) = x.shape, ev.shape()
    if h % oh or w % ow:
        ev.fail(f"adaptive average pooling {h}x{w}->{oh}x{ow} with unequal windows is not supported",
                "choose an input size divisible by the output size")
    kernel = (h // oh, w // ow)
    return ev.linear(x, Conv2d(x.shape, torch.ones(c, 1, *kernel, dtype=ev.dtype) / (kernel[0] * kernel[1]), kernel,
                               (0, 0, 0, 0), (1, 1), c))


@register_module_rule(nn.AdaptiveAvgPool2d)
def _adaptive_avg_pool_module(ev, node, m, args, kwargs):
    return _adaptive_avg_pool(ev, args[0])


@register_function_rule(F.adaptive_avg_pool2d)
def _adaptive_avg_pool_function(ev, node, args, kwargs):
    return _adaptive_avg_pool(ev, args[0])


@register_function_rule(torch.mean, "mean", torch.sum, "sum")
def _reduce_rule(ev, node, args, kwargs):
    x: Tracked = args[0]
    dims = _arg(args, kwargs, 1, "dim", None)
    if dims is None:
        ev.fail("reducing over the batch dimension mixes examples; pass dim=")
    ndim = len(x.shape) + 1
    dims = tuple(sorted({d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}))
    if 0 in dims:
        ev.fail("reducing over the batch dimension mixes examples")
    count = math.prod(x.shape[d - 1] for d in dims)
    scale = 1.0 / count if node.target in (torch.mean, "mean") else 1.0
    return ev.linear(x, Reduce(x.shape, ev.shape(), tuple(d - 1 for d in dims), scale))


# -- shape manipulation


def _reshape_rule(ev, node, *rest):
    x = next(a for a in rest[-2] if isinstance(a, Tracked))
    return ev.linear(x, Reshape(x.shape, ev.shape())) if x.shape != ev.shape() else x


for _t in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "flatten", "view", "reshape", "squeeze",
           "unsqueeze", "unflatten", "view_as", "reshape_as"):
    (METHOD_RULES if isinstance(_t, str) else FUNCTION_RULES)[_t] = _reshape_rule
MODULE_RULES[nn.Flatten] = MODULE_RULES[nn.Unflatten] = _reshape_rule


def _permutation(ev: Evaluator, ndim: int, dims) -> tuple[int, ...]:
    dims = tuple(d % ndim for d in dims)
    if dims[0] != 0:
        ev.fail("permuting the batch dimension away from dim 0 is not supported")
    return tuple(d - 1 for d in dims[1:])


@register_function_rule(torch.permute, "permute")
def _permute_rule(ev, node, args, kwargs):
    x = args[0]
    dims = _arg(args, kwargs, 1, "dims")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else tuple(args[1:])
    return ev.linear(x, Permute(x.shape, _permutation(ev, len(x.shape) + 1, dims)))


@register_function_rule(torch.transpose, "transpose", "swapaxes", torch.swapaxes)
def _transpose_rule(ev, node, args, kwargs):
    x = args[0]
    ndim = len(x.shape) + 1
    d0, d1 = _arg(args, kwargs, 1, "dim0") % ndim, _arg(args, kwargs, 2, "dim1") % ndim
    dims = list(range(ndim))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return ev.linear(x, Permute(x.shape, _permutation(ev, ndim, dims)))


def _basic_index(ev: Evaluator, index) -> tuple:
    index = index if isinstance(index, tuple) else (index,)
    for i in index:
        if not (i is None or i is Ellipsis or isinstance(i, int) or (isinstance(i, slice) and (i.step or 1) > 0)):
            ev.fail("only basic indexing (ints, slices, None, ...) of an input-dependent tensor is supported")
    if index and index[0] is Ellipsis:
        return index
    if not index or index[0] != slice(None):
        ev.fail("indexing the batch dimension is not supported")
    return index[1:]


@register_function_rule(operator.getitem)
def _getitem_rule(ev, node, args, kwargs):
    x, index = args
    if isinstance(x, (tuple, list)):
        return x[index]
    idx = _basic_index(ev, index)
    if idx and idx[0] is Ellipsis:
        # keep the batch dim explicit so Select indexes the non-batch dims
        idx = (Ellipsis, *idx[1:])
    return ev.linear(x, Select(x.shape, ev.shape(), idx))


def _split_parts(ev: Evaluator, x: Tracked, sizes: list[int], dim: int) -> tuple[Tracked, ...]:
    ndim = len(x.shape) + 1
    dim = dim % ndim
    if dim == 0:
        ev.fail("splitting the batch dimension is not supported")
    parts, start = [], 0
    for size in sizes:
        index = (slice(None),) * (dim - 1) + (slice(start, start + size),)
        shape = list(x.shape)
        shape[dim - 1] = size
        parts.append(ev.linear(x, Select(x.shape, tuple(shape), index)))
        start += size
    return tuple(parts)


@register_function_rule(torch.chunk, "chunk")
def _chunk_rule(ev, node, args, kwargs):
    x, chunks = args[0], _arg(args, kwargs, 1, "chunks")
    dim = _arg(args, kwargs, 2, "dim", 0) % (len(x.shape) + 1)
    size = x.shape[dim - 1]
    step = -(-size // chunks)
    return _split_parts(ev, x, [min(step, size - i) for i in range(0, size, step)], dim)


@register_function_rule(torch.split, "split")
def _split_rule(ev, node, args, kwargs):
    x, split = args[0], _arg(args, kwargs, 1, "split_size_or_sections")
    dim = _arg(args, kwargs, 2, "dim", 0) % (len(x.shape) + 1)
    size = x.shape[dim - 1]
    sizes = list(split) if isinstance(split, (list, tuple)) else [min(split, size - i) for i in range(0, size, split)]
    return _split_parts(ev, x, sizes, dim)


@register_function_rule(torch.unbind, "unbind")
def _unbind_rule(ev, node, args, kwargs):
    x = args[0]
    ndim = len(x.shape) + 1
    dim = _arg(args, kwargs, 1, "dim", 0) % ndim
    if dim == 0:
        ev.fail("unbinding the batch dimension is not supported")
    shape = tuple(s for i, s in enumerate(x.shape) if i != dim - 1)
    return tuple(ev.linear(x, Select(x.shape, shape, (slice(None),) * (dim - 1) + (i,)))
                 for i in range(x.shape[dim - 1]))


@register_function_rule(torch.cat, torch.concat, torch.concatenate)
def _cat_rule(ev, node, args, kwargs):
    tensors = _arg(args, kwargs, 0, "tensors")
    out_shape = ev.shape()
    dim = _arg(args, kwargs, 1, "dim", 0) % (len(out_shape) + 1)
    if dim == 0:
        ev.fail("concatenating along the batch dimension is not supported")
    sizes = [(t.shape[dim - 1] if isinstance(t, Tracked) else t.shape[dim]) for t in tensors]
    sources = {s for t in tensors if isinstance(t, Tracked) for s in t.form}
    form: dict[str, LinearOperator] = {}
    for source in sources:
        parts = [t.form.get(source) if isinstance(t, Tracked) else None for t in tensors]
        in_shape = next(p.in_shape for p in parts if p is not None)
        form[source] = Concat(in_shape, out_shape, parts, sizes, dim - 1)
    return Tracked(out_shape, form)


@register_function_rule("expand", "expand_as")
def _expand_rule(ev, node, args, kwargs):
    return _broadcast(ev, args[0], ev.shape())


def _pad(ev: Evaluator, x: Tracked, pads, mode: str = "constant") -> Tracked:
    if mode != "constant":
        ev.fail(f"padding mode {mode!r} is not supported", "use zero (constant) padding")
    # constant padding (and cropping, with negative pads) is linear up to a constant, norm 1
    return ev.linear(x, Pad(x.shape, ev.shape(), tuple(int(p) for p in pads)))


@register_function_rule(F.pad)
def _pad_rule(ev, node, args, kwargs):
    return _pad(ev, args[0], _arg(args, kwargs, 1, "pad"), _arg(args, kwargs, 2, "mode", "constant"))


@register_module_rule(nn.ZeroPad2d, nn.ConstantPad2d, nn.ZeroPad1d, nn.ConstantPad1d)
def _pad_module(ev, node, m, args, kwargs):
    return _pad(ev, args[0], m.padding)
