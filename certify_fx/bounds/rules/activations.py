"""Elementwise and groupwise nonlinearities: their global Lipschitz constants, with argument ranges.

Each constant is the supremum of ``|f'|`` (closed forms in :mod:`..constants`). Arguments that change
the function are checked: ``Softplus`` with a small ``threshold`` jumps, ``CELU`` with ``alpha <= 0``
is unbounded, ``softmax`` over the batch dimension mixes examples.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ... import nn as cnn
from ... import timm_layers
from .. import constants as C
from ..operators import Reshape, Select
from ..registry import register_module_rule, register_rule
from ..values import Refused, Tracked, TupleResult
from .common import broadcast, feature_dim, feature_dims, number
from .shape import concat_values

#: Softplus switches to the identity above ``threshold``; below this the jump is not negligible.
SOFTPLUS_MIN_THRESHOLD = 20.0


def _check_softplus(ev, beta, threshold) -> float:
    beta, threshold = number(beta), number(threshold)
    if not beta > 0:
        ev.fail(f"Softplus with beta={beta} is not supported", "use beta > 0")
    if not threshold >= SOFTPLUS_MIN_THRESHOLD:
        jump = math.log1p(math.exp(-threshold)) / beta
        ev.fail(f"Softplus with threshold={threshold} jumps by {jump:.3g} at x = threshold/beta, so it is not "
                "Lipschitz", f"use threshold >= {SOFTPLUS_MIN_THRESHOLD:g} (the default)")
    return 1.0


def _check_celu(ev, alpha) -> float:
    alpha = number(alpha)
    if not alpha > 0:
        ev.fail(f"CELU with alpha={alpha} is not Lipschitz (its slope exp(x/alpha) is unbounded)", "use alpha > 0")
    return 1.0


def _elu_constant(alpha) -> float:
    return max(1.0, abs(number(alpha)))


def _check_hardtanh(ev, min_val, max_val) -> float:
    if number(min_val) > number(max_val):
        ev.fail("Hardtanh with min_val > max_val")
    return 1.0


def _softmax_constant(ev, value, dim) -> float:
    if dim is None:
        ev.fail("softmax without dim picks a dimension implicitly (the batch dim for 3-d tensors)", "pass dim=")
    feature_dim(ev, dim, len(value.shape) + 1, "softmax")
    return 1.0  # its Jacobian diag(p) - p p^T has l2 norm <= 1/2


def _gelu_constant(approximate: str) -> float:
    return C.GELU_TANH if approximate == "tanh" else C.GELU


# -- functions and Tensor methods --------------------------------------------------------------


@register_rule(F.relu, torch.relu, "relu", kind="activation")
def relu(ev, input, inplace=False):
    return ev.nonlinear(input, 1.0, monotone=True)


@register_rule(F.relu6, kind="activation")
def relu6(ev, input, inplace=False):
    return ev.nonlinear(input, 1.0, monotone=True)


@register_rule(F.hardtanh, kind="activation")
def hardtanh(ev, input, min_val=-1.0, max_val=1.0, inplace=False):
    return ev.nonlinear(input, _check_hardtanh(ev, min_val, max_val))


@register_rule(torch.tanh, F.tanh, "tanh", kind="activation")
@register_rule(F.softsign, F.logsigmoid)
def monotone_one_lipschitz(ev, input):
    return ev.nonlinear(input, 1.0, monotone=True)


@register_rule(torch.abs, "abs")
def one_lipschitz(ev, input):
    return ev.nonlinear(input, 1.0)


@register_rule(F.softshrink)
def softshrink(ev, input, lambd=0.5):
    if not isinstance(lambd, (int, float)) or not math.isfinite(lambd) or lambd < 0:
        ev.fail(f"the threshold lambd={lambd!r} must be a number >= 0")
    return ev.nonlinear(input, 1.0)  # slopes 0 and 1


@register_rule(F.softplus, kind="activation")
def softplus(ev, input, beta=1.0, threshold=20.0):
    return ev.nonlinear(input, _check_softplus(ev, beta, threshold))


def _against_constant(ev, input):
    """An elementwise 1-Lipschitz op of ``input`` and a constant (``clamp(x, lo, hi)``,
    ``max(x, c)``): the constant may broadcast ``input`` to a larger shape, and each copy of an
    input element then moves with it, so the copying (norm ``sqrt(copies)``) is applied first."""
    return ev.nonlinear(broadcast(ev, input, ev.shape()), 1.0)


@register_rule(torch.clamp, torch.clip, "clamp", "clip")
def clamp(ev, input, min=None, max=None):
    # a constant bound (number or tensor) keeps clamp 1-Lipschitz in its input
    return _against_constant(ev, input)


@register_rule("clamp_min", torch.clamp_min)
def clamp_min(ev, input, min):
    return _against_constant(ev, input)


@register_rule("clamp_max", torch.clamp_max)
def clamp_max(ev, input, max):
    return _against_constant(ev, input)


@register_rule(F.softmax, F.softmin)
def softmax_function(ev, input, dim=None, _stacklevel=3, dtype=None):
    if dtype is not None:
        ev.fail(f"softmax with dtype={dtype} casts; the bound assumes float32/float64", "drop dtype=")
    return ev.nonlinear(input, _softmax_constant(ev, input, dim))


@register_rule(torch.softmax, "softmax")
def softmax(ev, input, dim, dtype=None):
    return softmax_function(ev, input, dim, 3, dtype)


@register_rule(F.celu, kind="activation")
def celu(ev, input, alpha=1.0, inplace=False):
    return ev.nonlinear(input, _check_celu(ev, alpha))


@register_rule(F.leaky_relu, kind="activation")
def leaky_relu(ev, input, negative_slope=0.01, inplace=False):
    return ev.nonlinear(input, max(1.0, abs(number(negative_slope))))


@register_rule(F.elu, kind="activation")
def elu(ev, input, alpha=1.0, inplace=False):
    return ev.nonlinear(input, _elu_constant(alpha))


@register_rule(F.selu, torch.selu, kind="activation")
def selu(ev, input, inplace=False):
    return ev.nonlinear(input, C.SELU)


@register_rule(F.gelu, kind="activation")
def gelu(ev, input, approximate="none"):
    if approximate not in ("none", "tanh"):
        ev.fail(f"gelu with approximate={approximate!r}")
    return ev.nonlinear(input, _gelu_constant(approximate))


SMOOTH_FUNCTIONS: dict = {F.silu: C.SILU, F.mish: C.MISH, F.hardswish: C.HARDSWISH, F.hardsigmoid: C.HARDSIGMOID}


@register_rule(*(f for f in SMOOTH_FUNCTIONS if f is not F.hardsigmoid), kind="activation")
@register_rule(F.hardsigmoid)  # a gate more than an activation (squeeze-excitation)
def smooth_activation(ev, input, inplace=False):
    return ev.nonlinear(input, SMOOTH_FUNCTIONS[ev.node.target])


@register_rule(torch.sigmoid, F.sigmoid, "sigmoid", kind="activation")
def sigmoid(ev, input):
    return ev.nonlinear(input, C.SIGMOID)


@register_rule(torch.logsumexp, "logsumexp")
def logsumexp(ev, input, dim, keepdim=False):
    # its gradient is a softmax: l1 norm 1, so l2 norm <= 1; disjoint groups per output
    feature_dims(ev, dim, len(input.shape) + 1, "logsumexp")
    return ev.nonlinear(input, 1.0, "logsumexp")


@register_rule(torch.amax, "amax", torch.amin, "amin")
def amax(ev, input, dim=(), keepdim=False):
    # every output is the max (min) over its own disjoint set of inputs
    feature_dims(ev, dim, len(input.shape) + 1, "a max/min reduction")
    return ev.nonlinear(input, 1.0)


def _indices(op: str) -> Refused:
    return Refused(f"the indices returned by {op} are not a continuous function of the input",
                   "use only the values (e.g. `x.max(dim).values`)")


#: the ops that keep the larger element of a pair (the others keep the smaller)
_LARGER = (torch.max, "max", torch.maximum, "maximum")


def _elementwise_pair(ev, a, b, nodes: tuple, larger: bool):
    """``max(a, b)`` / ``min(a, b)``, elementwise.

    With one side constant, it is 1-Lipschitz in the other (:func:`_against_constant`). With both
    input-dependent, each element pair ``(a_i, b_i)`` is sorted: ``(a, b) -> (max, min)`` is
    1-Lipschitz in l2 (GroupSort of size 2), so it becomes one source, the sorted pair, bounded by
    the Lipschitz constant of ``(a, b)`` stacked; ``max`` and ``min`` are its two halves. The
    ``min`` of the same two tensors (computed the same way: :meth:`value_key`, so ``x[:, :c]``
    written twice counts as one) reuses that source, so a MinMax written as ``cat([max(a, b),
    min(a, b)])`` (orthogonium's MaxMin, however it is spelled) is bounded as exactly as MinMax.
    ``nodes`` are the graph arguments ``a`` and ``b`` came from.
    """
    if not isinstance(a, Tracked):
        a, b = b, a
    if not isinstance(b, Tracked):
        return _against_constant(ev, a)
    out = ev.shape()
    pair_shape = (2, *out)
    key = ("sorted pair", frozenset(ev.value_key(n) for n in nodes), pair_shape)  # min(b, a) is the same pair
    pair = ev.shared.get(key)
    if pair is None:
        halves = [ev.linear(broadcast(ev, t, out), Reshape(out, (1, *out))) for t in (a, b)]
        joint = concat_values(ev, halves, 1, pair_shape)  # dim 1 counts the batch: the new leading dim
        pair = ev.shared[key] = ev.nonlinear(joint, 1.0, "sort of each pair (max, min)", shape=pair_shape)
    return ev.linear(pair, Select(pair_shape, out, (0 if larger else 1,)))


@register_rule(torch.maximum, "maximum", torch.minimum, "minimum", inputs=("input", "other"))
def maximum(ev, input, other):
    nodes = (ev.graph_argument("input"), ev.graph_argument("other"))
    return _elementwise_pair(ev, input, other, nodes, ev.node.target in _LARGER)


#: comparisons, and whether ``where(p OP q, p, q)`` keeps the larger of ``p`` and ``q``
_COMPARISONS = {operator.gt: True, operator.ge: True, torch.gt: True, torch.ge: True, torch.greater: True,
                torch.greater_equal: True, "gt": True, "ge": True, "greater": True, "greater_equal": True,
                operator.lt: False, operator.le: False, torch.lt: False, torch.le: False, torch.less: False,
                torch.less_equal: False, "lt": False, "le": False, "less": False, "less_equal": False}


@register_rule(*_COMPARISONS, inputs=("input", "other"))
def comparison(ev, input, other):
    return Refused("a comparison of input-dependent values is not a continuous function of the input",
                   "use torch.maximum / torch.minimum (where(a > b, a, b) is read as max(a, b))")


@register_rule(torch.where, "where", inputs=("input", "other"), patterns=("condition",))
def where(ev, condition, input, other):
    """``where(p > q, p, q)`` is ``max(p, q)`` and ``where(p > q, q, p)`` is ``min(p, q)`` (any
    comparison, either order): read as :func:`_elementwise_pair` when the condition compares the
    very two values the branches pick (:meth:`value_key`); anything else is refused."""
    cond, branches = ev.graph_argument("condition"), (ev.graph_argument("input"), ev.graph_argument("other"))
    if not (isinstance(cond, fx.Node) and cond.op in ("call_function", "call_method")
            and cond.target in _COMPARISONS and len(cond.args) == 2 and not cond.kwargs):
        ev.fail("where() with a condition other than a comparison of its two branches is not continuous",
                "use torch.maximum / torch.minimum, or a constant mask")
    p, q = cond.args
    keys = [ev.value_key(n) for n in (p, q, *branches[1:])]
    picks_first = keys[0] == ev.value_key(branches[0]) and keys[1] == keys[2]  # where(p ? q, p, q)
    picks_second = keys[1] == ev.value_key(branches[0]) and keys[0] == keys[2]  # where(p ? q, q, p)
    if not (picks_first or picks_second) or keys[0] == keys[1]:
        ev.fail("where() picks other values than the two its condition compares: not continuous",
                "use torch.maximum / torch.minimum")
    larger = _COMPARISONS[cond.target] == picks_first
    return _elementwise_pair(ev, input, other, branches, larger)


@register_rule(torch.max, "max", torch.min, "min", inputs=("input", "dim"))
def max_(ev, input, dim=None, keepdim=False):
    if isinstance(dim, (torch.Tensor, Tracked)) or isinstance(input, torch.Tensor):  # max(input, other)
        nodes = (ev.graph_argument("input"), ev.graph_argument("dim"))  # torch.max(input, other) fills dim
        return _elementwise_pair(ev, input, dim, nodes, ev.node.target in _LARGER)
    if dim is None:
        ev.fail("max/min over every dimension mixes the examples of a batch", "pass dim=")
    feature_dim(ev, dim, len(input.shape) + 1, "max/min")
    return TupleResult((ev.nonlinear(input, 1.0, part=0), _indices("max/min")), ("values", "indices"))


@register_rule(torch.sort, "sort")
def sort(ev, input, dim=-1, descending=False, stable=False):
    # sorting each group is a GroupSort: 1-Lipschitz
    feature_dim(ev, dim, len(input.shape) + 1, "sort")
    return TupleResult((ev.nonlinear(input, 1.0, part=0), _indices("sort")), ("values", "indices"))


@register_rule(torch.topk, "topk")
def topk(ev, input, k, dim=-1, largest=True, sorted=True):
    # the k largest of each group: k outputs of a sort, 1-Lipschitz
    feature_dim(ev, dim, len(input.shape) + 1, "topk")
    return TupleResult((ev.nonlinear(input, 1.0, part=0), _indices("topk")), ("values", "indices"))


# -- modules -----------------------------------------------------------------------------------


@register_module_rule(nn.ReLU, nn.ReLU6, nn.Tanh, kind="activation")
@register_module_rule(nn.Softsign, nn.LogSigmoid, nn.Softshrink)
def one_lipschitz_module(ev, module, input):
    return ev.nonlinear(input, 1.0, monotone=True)  # each of them is nondecreasing


@register_module_rule(nn.Hardtanh, kind="activation")
def hardtanh_module(ev, module, input):
    return ev.nonlinear(input, _check_hardtanh(ev, module.min_val, module.max_val))


@register_module_rule(nn.Softplus, kind="activation")
def softplus_module(ev, module, input):
    return ev.nonlinear(input, _check_softplus(ev, module.beta, module.threshold))


@register_module_rule(nn.Softmax, nn.Softmin)
def softmax_module(ev, module, input):
    return ev.nonlinear(input, _softmax_constant(ev, input, module.dim))


@register_module_rule(nn.CELU, kind="activation")
def celu_module(ev, module, input):
    return ev.nonlinear(input, _check_celu(ev, module.alpha))


@register_module_rule(nn.LeakyReLU, kind="activation")
def leaky_relu_module(ev, module, input):
    return ev.nonlinear(input, max(1.0, abs(module.negative_slope)))


@register_module_rule(nn.ELU, kind="activation")
def elu_module(ev, module, input):
    return ev.nonlinear(input, _elu_constant(module.alpha))


def _prelu_constant(ev, weight: torch.Tensor) -> float:
    """``max(1, max |slope|)``: PReLU is piecewise linear with slopes 1 and ``weight``."""
    if not isinstance(weight, torch.Tensor):
        ev.fail("PReLU's slope must be a constant tensor")
    weight = weight.detach()
    if not bool(torch.isfinite(weight).all()):
        ev.fail("PReLU has a non-finite slope")
    return max(1.0, float(weight.abs().max()))


@register_rule(F.prelu, torch.prelu, "prelu", kind="activation")
def prelu(ev, input, weight):
    return ev.nonlinear(input, _prelu_constant(ev, weight))


@register_module_rule(nn.PReLU, kind="activation")
def prelu_module(ev, module, input):
    return ev.nonlinear(input, _prelu_constant(ev, module.weight))


@register_module_rule(nn.GELU, kind="activation")
def gelu_module(ev, module, input):
    return ev.nonlinear(input, _gelu_constant(module.approximate))


SMOOTH_MODULES: dict[type, float] = {
    nn.SELU: C.SELU, nn.SiLU: C.SILU, nn.Mish: C.MISH, nn.Sigmoid: C.SIGMOID, nn.Hardswish: C.HARDSWISH,
    nn.Hardsigmoid: C.HARDSIGMOID,
}


_TIMM_CONSTANTS = {"GELU": C.GELU, "GELUTanh": C.GELU_TANH, "Swish": C.SILU, "Mish": C.MISH, "Sigmoid": C.SIGMOID,
                   "Tanh": 1.0, "HardSwish": C.HARDSWISH, "HardSigmoid": C.HARDSIGMOID}
SMOOTH_MODULES.update({cls: _TIMM_CONSTANTS[name] for name, cls in timm_layers.ACTIVATIONS.items()})


@register_module_rule(*(t for t in SMOOTH_MODULES if t is not nn.Hardsigmoid), kind="activation")
@register_module_rule(nn.Hardsigmoid)  # a gate more than an activation (squeeze-excitation)
def smooth_module(ev, module, input):
    for cls in type(module).__mro__:
        if cls in SMOOTH_MODULES:
            return ev.nonlinear(input, SMOOTH_MODULES[cls])
    ev.fail("no Lipschitz constant for this activation")


@register_module_rule(cnn.GroupSort, cnn.MinMax)
def group_sort_module(ev, module, input):
    # sorting within disjoint groups permutes each group: 1-Lipschitz
    feature_dim(ev, module.dim, len(input.shape) + 1, type(module).__name__)
    return ev.nonlinear(input, 1.0)


@register_module_rule(cnn.SmoothSoftplus)
def smooth_softplus_module(ev, module, input):
    return ev.nonlinear(input, 1.0)  # derivative sigmoid(t) in (0, 1)


@register_module_rule(cnn.HouseHolder)
def householder_module(ev, module, input):
    # identity or a reflection per channel pair, agreeing on the mirror: 1-Lipschitz
    feature_dim(ev, module.dim, len(input.shape) + 1, type(module).__name__)
    return ev.nonlinear(input, 1.0)
