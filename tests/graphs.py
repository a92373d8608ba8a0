"""Random small graphs drawn from the whole op vocabulary the bound compiler accepts.

Every op maps a (B, 4, 4, 4) tensor to a (B, 4, 4, 4) tensor (ops that change the shape restore
it), so ops compose freely; a drawn model is a chain of ops, some with a residual connection,
and a dense head to 5 logits. Each op names the rules it exercises; ``tests/test_properties.py``
checks that every registered rule is exercised by an accepted op or refused by a refusal case.
Random arguments cover each op's accepted range (slopes, alphas, clamp bounds, strides, modes).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, DropPath
from torch import nn

from certify_fx import nn as cnn

SHAPE = (4, 4, 4)
CLASSES = 5


class Const(nn.Module):
    """Holds an op's constant tensors as buffers (so ``.double()`` converts them too)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


@dataclass
class Op:
    name: str
    rules: tuple[str, ...]
    build: Callable[[random.Random], tuple[Callable, nn.Module]]
    linear: bool
    autograd: bool = True  # False: autograd does not see the function (detach), so no gradient checks


VOCABULARY: list[Op] = []


def op(name: str, rules: str, linear: bool = False, autograd: bool = True):
    def deco(build):
        VOCABULARY.append(Op(name, tuple(rules.split()), build, linear, autograd))
        return build

    return deco


def _randn(r: random.Random, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(r.randrange(2**31))
    return torch.randn(*shape, generator=g)


def _id():
    return nn.Identity()


# -- activations -------------------------------------------------------------------------------
@op("relu", "activations.relu")
def _(r):
    form = r.choice(["F", "torch", "method", "inplace", "method_"])
    fns = {"F": lambda x, m: F.relu(x), "torch": lambda x, m: torch.relu(x), "method": lambda x, m: x.relu(),
           "inplace": lambda x, m: F.relu(x * 1.0, inplace=True), "method_": lambda x, m: (x * 1.0).relu_()}
    return fns[form], _id()


@op("relu6", "activations.relu6")
def _(r):
    return (lambda x, m: F.relu6(3 * x)), _id()


@op("hardtanh", "activations.hardtanh")
def _(r):
    lo = r.uniform(-2, 0)
    hi = lo + r.uniform(0, 2)
    return (lambda x, m: F.hardtanh(x, lo, hi)), _id()


@op("householder", "activations.householder_module")
def _(r):
    layer = cnn.HouseHolder(4)
    with torch.no_grad():
        layer.theta.copy_(_randn(r, 2) * 3)
    return (lambda x, m: m(x)), layer


@op("smooth_softplus", "activations.smooth_softplus_module")
def _(r):
    return (lambda x, m: m(3 * x)), cnn.SmoothSoftplus()


@op("one_lipschitz", "activations.one_lipschitz activations.monotone_one_lipschitz")
def _(r):
    fn = r.choice([torch.tanh, F.tanh, torch.abs, F.softsign, F.logsigmoid])
    return (lambda x, m: fn(2 * x)), _id()


@op("tanh_abs_methods", "activations.one_lipschitz activations.monotone_one_lipschitz")
def _(r):
    return (lambda x, m: x.tanh() + x.abs()), _id()


@op("softshrink", "activations.softshrink")
def _(r):
    lambd = r.uniform(0, 1)
    return (lambda x, m: F.softshrink(2 * x, lambd)), _id()


@op("gated_residual", "activations.relu linear.linear linear.matmul")
def _(r):
    """x - 2 W T^-1 relu(W^T x + b) (SLL) or x - 2/||W||^2 W relu(W^T x) (CPL), on the last dim
    (certified by the gated residual certificate), or a gate whose residual breaks the structure."""
    w = _randn(r, 3, 4)
    b = _randn(r, 3) * 0.3
    q = torch.rand(3, generator=torch.Generator().manual_seed(r.randrange(2**31))) + 0.5
    kind = r.choice(["sll", "cpl", "broken"])
    if kind == "sll":
        scale = 2 / (torch.abs(w @ w.T) * q[None, :] / q[:, None]).sum(1)
    elif kind == "cpl":
        scale = torch.full((3,), 2 / torch.linalg.matrix_norm(w, ord=2).item() ** 2)
    else:
        scale = torch.rand(3, generator=torch.Generator().manual_seed(r.randrange(2**31))) * 3
    return (lambda x, m: x - (F.relu(F.linear(x, m.w, m.b)) * m.s) @ m.w), Const(w=w, b=b, s=scale)


@op("fourier_region", "", linear=True)
def _(r):
    """A conv applied in the Fourier domain: a product per frequency (elementwise, or a channel
    matmul with the batch moved last as Trockman et al. write it), then the inverse transform."""
    g = torch.Generator().manual_seed(r.randrange(2**31))
    kernel = torch.randn(4, 4, 3, 3, generator=g) * 0.3
    spectrum = torch.fft.rfft2(kernel, s=(4, 4)).permute(2, 3, 0, 1)  # (4, 3, cout, cin)
    norm = r.choice(["backward", "ortho"])

    def batched(x, m):
        b = x.shape[0]
        xf = torch.fft.rfft2(x, norm=norm).permute(2, 3, 1, 0).reshape(12, 4, b)
        yf = (m.q.to(xf.dtype).reshape(12, 4, 4) @ xf).reshape(4, 3, 4, b)
        return torch.fft.irfft2(yf.permute(3, 2, 0, 1), s=(4, 4), norm=norm)

    def elementwise(x, m):
        spectrum = torch.fft.rfft2(x)
        return torch.fft.irfft2(spectrum * m.q[:, :, 0, 0].conj().to(spectrum.dtype), s=(4, 4)) + 0.5

    return r.choice([batched, elementwise]), Const(q=spectrum)


@op("matmul_left", "linear.matmul", linear=True)
def _(r):
    return (lambda x, m: m.w @ x), Const(w=_randn(r, 4, 4))


@op("softplus", "activations.softplus")
def _(r):
    beta, threshold = r.uniform(0.5, 3), r.uniform(20, 40)
    return (lambda x, m: F.softplus(x, beta, threshold)), _id()


@op("clamp", "activations.clamp")
def _(r):
    lo, hi = r.uniform(-1, 0), r.uniform(0, 1)
    form = r.choice(["torch", "clip", "method", "tensor_bound"])
    if form == "tensor_bound":
        return (lambda x, m: torch.clamp(x, min=m.lo)), Const(lo=_randn(r, 4, 1, 1) * 0.3)
    fns = {"torch": lambda x, m: torch.clamp(x, lo, hi), "clip": lambda x, m: torch.clip(x, max=hi),
           "method": lambda x, m: x.clamp(min=lo)}
    return fns[form], _id()


@op("against_a_broadcasting_constant", "activations.clamp activations.max_ activations.clamp_min shape.getitem")
def _(r):
    """A constant bound of a larger shape copies each input element: sqrt(copies) is part of the bound."""
    form = r.choice(["clamp", "max", "clamp_min"])
    fns = {"clamp": lambda x, m: torch.clamp(x[:, :1], min=m.lo), "max": lambda x, m: torch.max(x[:, :1], m.lo),
           "clamp_min": lambda x, m: x[:, :1].clamp_min(m.lo)}
    return fns[form], Const(lo=_randn(r, *SHAPE) * 0.3)


@op("elementwise_max_min", "activations.max_ activations.maximum shape.getitem shape.cat")
def _(r):
    """MinMax as research code writes it: max and min of two halves (the same slices computed
    again, or swapped), a lone max, and max/min of two different tensors of one source."""
    form = r.choice(["max_min", "maximum_swapped", "method", "lone_max", "two_branches", "broadcast"])
    fns = {
        "max_min": lambda x, m: torch.cat([torch.max(x[:, :2], x[:, 2:]), torch.min(x[:, :2], x[:, 2:])], 1),
        "maximum_swapped": lambda x, m: torch.cat([torch.maximum(x[:, 2:], x[:, :2]),
                                                   torch.minimum(x[:, :2], x[:, 2:])], 1),
        "method": lambda x, m: torch.cat([x[:, 1::2].max(x[:, ::2]), x[:, 1::2].min(x[:, ::2])], 1),
        "lone_max": lambda x, m: torch.max(x, x.flip(1) * 0.5 + m.c),
        "two_branches": lambda x, m: torch.cat([torch.max(x[:, :2], -x[:, 2:]), torch.min(x[:, :2], x[:, 2:])], 1),
        "broadcast": lambda x, m: torch.maximum(x[:, :1], x) + torch.minimum(x, x[:, :1]),
    }
    return fns[form], Const(c=_randn(r, *SHAPE) * 0.3)


@op("where_max_min", "activations.where activations.comparison shape.getitem shape.cat")
def _(r):
    """max and min written with where (LiResNet's MinMax), any comparison and order, and relu."""
    form = r.choice(["gt", "lt_ge", "relu"])
    fns = {
        "gt": lambda x, m: torch.cat([torch.where(x[:, :2] > x[:, 2:], x[:, :2], x[:, 2:]),
                                      torch.where(x[:, :2] > x[:, 2:], x[:, 2:], x[:, :2])], 1),
        "lt_ge": lambda x, m: torch.cat([torch.where(x[:, :2] < x[:, 2:], x[:, 2:], x[:, :2]),
                                         torch.where(x[:, 2:] >= x[:, :2], x[:, :2], x[:, 2:])], 1),
        "relu": lambda x, m: torch.where(x > 0, x, 0),
    }
    return fns[form], _id()


@op("copying_pad", "shape.pad shape.copying_pad_module shape.getitem", linear=True)
def _(r):
    """Circular, reflect and replicate padding copy elements: bounded by sqrt(most copies), exactly."""
    mode = r.choice(["circular", "reflect", "replicate"])
    p = r.choice([1, 2])
    if r.random() < 0.5:
        return (lambda x, m: F.pad(x, (p, p, p, p), mode=mode)[:, :, p:-p, :4]), _id()
    module = {"circular": nn.CircularPad2d, "reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d}[mode](p)
    return (lambda x, m: m(x)[:, :, :4, p:p + 4]), module


@op("clamp_min_max", "activations.clamp_min activations.clamp_max")
def _(r):
    return (lambda x, m: x.clamp_min(-0.5) + torch.clamp_max(x, 0.3)), _id()


@op("softmax", "activations.softmax_function activations.softmax")
def _(r):
    dim = r.choice([1, 2, -1])
    return (lambda x, m: F.softmax(3 * x, dim=dim) + torch.softmax(x, dim) + x.softmax(dim) + F.softmin(x, dim)), _id()


@op("celu", "activations.celu")
def _(r):
    alpha = r.uniform(0.2, 2)
    return (lambda x, m: F.celu(x, alpha)), _id()


@op("leaky_relu", "activations.leaky_relu")
def _(r):
    slope = r.uniform(-2, 2)
    return (lambda x, m: F.leaky_relu(x, slope)), _id()


@op("elu", "activations.elu")
def _(r):
    alpha = r.uniform(-2, 2)
    return (lambda x, m: F.elu(x, alpha)), _id()


@op("selu", "activations.selu")
def _(r):
    return (lambda x, m: F.selu(x) + torch.selu(x)), _id()


@op("gelu", "activations.gelu")
def _(r):
    approximate = r.choice(["none", "tanh"])
    return (lambda x, m: F.gelu(2 * x, approximate=approximate)), _id()


@op("smooth", "activations.smooth_activation")
def _(r):
    fn = r.choice([F.silu, F.mish, F.hardswish, F.hardsigmoid])
    return (lambda x, m: fn(3 * x)), _id()


@op("sigmoid", "activations.sigmoid")
def _(r):
    return (lambda x, m: torch.sigmoid(4 * x) + x.sigmoid()), _id()


@op("logsumexp", "activations.logsumexp")
def _(r):
    return (lambda x, m: x + torch.logsumexp(3 * x, dim=1, keepdim=True)), _id()


@op("amax", "activations.amax")
def _(r):
    return (lambda x, m: x + torch.amax(x, dim=(2, 3), keepdim=True) - x.amin(1, keepdim=True)), _id()


@op("max_dim", "activations.max_ shape.getattr_ shape.getitem")
def _(r):
    form = r.choice(["values", "getitem", "min", "const_other"])
    fns = {"values": lambda x, m: x + 2 * torch.max(x, 1, keepdim=True).values,
           "getitem": lambda x, m: x - x.max(dim=2, keepdim=True)[0],
           "min": lambda x, m: x + torch.min(x, 3, keepdim=True).values,
           "const_other": lambda x, m: torch.max(x, m.c)}
    return fns[form], Const(c=_randn(r, 4, 4, 4) * 0.2)


@op("sort", "activations.sort shape.getitem")
def _(r):
    descending = r.random() < 0.5
    return (lambda x, m: 2 * x.sort(dim=1, descending=descending)[0]), _id()


@op("topk", "activations.topk shape.getattr_ shape.cat")
def _(r):
    return (lambda x, m: torch.cat([x.topk(2, dim=1).values, x[:, 2:]], 1)), _id()


@op("activation_modules", "activations.one_lipschitz_module")
def _(r):
    return (lambda x, m: m(2 * x)), r.choice([nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), nn.Tanh(), nn.Softsign(),
                                              nn.LogSigmoid(), nn.Softshrink(r.uniform(0, 1))])


@op("hardtanh_module", "activations.hardtanh_module")
def _(r):
    return (lambda x, m: m(x)), nn.Hardtanh(-r.uniform(0, 1), r.uniform(0, 1))


@op("softplus_module", "activations.softplus_module")
def _(r):
    return (lambda x, m: m(x)), nn.Softplus(r.uniform(0.5, 2), r.uniform(20, 30))


@op("softmax_module", "activations.softmax_module")
def _(r):
    return (lambda x, m: m(3 * x)), r.choice([nn.Softmax(dim=1), nn.Softmin(dim=-1)])


@op("celu_module", "activations.celu_module")
def _(r):
    return (lambda x, m: m(x)), nn.CELU(r.uniform(0.2, 2))


@op("leaky_relu_module", "activations.leaky_relu_module")
def _(r):
    return (lambda x, m: m(x)), nn.LeakyReLU(r.uniform(-3, 3))


@op("elu_module", "activations.elu_module")
def _(r):
    return (lambda x, m: m(x)), nn.ELU(r.uniform(-2, 2))


@op("prelu_module", "activations.prelu_module activations.prelu")
def _(r):
    m = nn.PReLU(4)
    with torch.no_grad():
        m.weight.copy_(_randn(r, 4) * 2)
    if r.random() < 0.5:  # the function form, as code that keeps its own slope parameter writes it
        return (lambda x, mod: F.prelu(x, mod.weight)), m
    return (lambda x, mod: mod(x)), m


@op("gelu_module", "activations.gelu_module")
def _(r):
    return (lambda x, m: m(2 * x)), nn.GELU(approximate=r.choice(["none", "tanh"]))


@op("smooth_module", "activations.smooth_module")
def _(r):
    from timm.layers import activations as ta

    return (lambda x, m: m(3 * x)), r.choice([nn.SELU(), nn.SiLU(), nn.Mish(), nn.Sigmoid(), nn.Hardswish(),
                                              nn.Hardsigmoid(), ta.GELU(), ta.Swish(), ta.HardSwish()])


@op("group_sort", "activations.group_sort_module")
def _(r):
    return (lambda x, m: m(x)), r.choice([cnn.MinMax(), cnn.GroupSort(4), cnn.MinMax(dim=-1)])


# -- linear ------------------------------------------------------------------------------------
@op("add", "linear.add_", linear=True)
def _(r):
    alpha = r.uniform(-3, 3)
    form = r.choice(["op", "torch", "method", "inplace", "iadd"])

    def iadd(x, m):
        y = 2 * x
        y += x.flip(2)
        return y

    fns = {"op": lambda x, m: x + x.flip(3) + 1.0, "torch": lambda x, m: torch.add(x, x.flip(2), alpha=alpha),
           "method": lambda x, m: x.add(m.c, alpha=alpha), "inplace": lambda x, m: (3 * x).add_(x.roll(1, 2)),
           "iadd": iadd}
    return fns[form], Const(c=_randn(r, 4, 4, 4))


@op("sub", "linear.sub", linear=True)
def _(r):
    alpha = r.uniform(-3, 3)
    form = r.choice(["op", "torch", "method", "rconst"])
    fns = {"op": lambda x, m: x - 2 * x.flip(1), "torch": lambda x, m: torch.sub(x, x.flip(3), alpha=alpha),
           "method": lambda x, m: x.sub(x.roll(1, 3), alpha=alpha), "rconst": lambda x, m: 1.0 - x}
    return fns[form], _id()


@op("rsub", "linear.rsub", linear=True)
def _(r):
    alpha = r.uniform(-3, 3)
    return (lambda x, m: torch.rsub(x, x.flip(2), alpha=alpha)), _id()


@op("neg_pos", "linear.neg linear.pos", linear=True)
def _(r):
    return (lambda x, m: -x + (+x.flip(1)) + torch.neg(x.roll(1, 2))), _id()


@op("mul", "linear.mul", linear=True)
def _(r):
    form = r.choice(["scalar", "tensor", "method", "inplace", "batch_const"])
    fns = {"scalar": lambda x, m: 3.0 * x, "tensor": lambda x, m: x * m.c, "method": lambda x, m: x.mul(m.c),
           "inplace": lambda x, m: (x + 0.0).mul_(m.c), "batch_const": lambda x, m: x * torch.ones_like(x) * 2}
    return fns[form], Const(c=_randn(r, 4, 1, 4))


@op("addcmul", "linear.addcmul", linear=True)
def _(r):
    form = r.choice(["affine", "method", "input_base"])
    value = r.uniform(-2, 2)
    fns = {"affine": lambda x, m: torch.addcmul(m.b, m.a, x),  # timm ResMLP's Affine
           "method": lambda x, m: x.addcmul(m.a, x.flip(1), value=value),
           "input_base": lambda x, m: torch.addcmul(x, x.roll(1, 2), m.a, value=value)}
    return fns[form], Const(a=_randn(r, 4, 1, 1), b=_randn(r, 4, 4, 4))


@op("div", "linear.div", linear=True)
def _(r):
    form = r.choice(["scalar", "tensor", "method"])
    fns = {"scalar": lambda x, m: x / 0.3, "tensor": lambda x, m: torch.div(x, m.c), "method": lambda x, m: x.div(m.c)}
    return fns[form], Const(c=_randn(r, 1, 4, 4).abs() + 0.5)


@op("matmul", "linear.matmul", linear=True)
def _(r):
    form = r.choice(["op", "torch", "method"])
    fns = {"op": lambda x, m: x @ m.w, "torch": lambda x, m: torch.matmul(x, m.w), "method": lambda x, m: x.matmul(m.w)}
    return fns[form], Const(w=_randn(r, 4, 4))


@op("linear", "linear.linear linear.linear_module linear.lln_module shape.flatten shape.view", linear=True)
def _(r):
    kind = r.choice(["F", "module", "lln"])
    if kind == "F":
        return (lambda x, m: F.linear(x.flatten(1), m.w, m.b).view(-1, 4, 4, 4)), Const(w=_randn(r, 64, 64) / 8,
                                                                                         b=_randn(r, 64))
    layer = nn.Linear(64, 64) if kind == "module" else cnn.LLNLinear(64, 64)
    return (lambda x, m: m(x.flatten(1)).view(x.shape[0], 4, 4, 4)), layer


@op("conv2d", "linear.conv linear.conv_module", linear=True)
def _(r):
    if r.random() < 0.5:
        stride, pad = r.choice([(1, 1), (1, "same")])
        return (lambda x, m: F.conv2d(x, m.w, m.b, stride, pad, 1, 1)), Const(w=_randn(r, 4, 4, 3, 3) / 3,
                                                                              b=_randn(r, 4))
    groups, dilation = r.choice([1, 2, 4]), r.choice([1, 2])
    return (lambda x, m: m(x)), nn.Conv2d(4, 4, 3, padding=dilation, dilation=dilation, groups=groups)


@op("conv1d", "linear.conv linear.conv_module shape.view", linear=True)
def _(r):
    if r.random() < 0.5:
        return (lambda x, m: F.conv1d(x.reshape(-1, 4, 16), m.w, padding=1).view(-1, 4, 4, 4)), Const(
            w=_randn(r, 4, 4, 3) / 3)
    return (lambda x, m: m(x.reshape(-1, 4, 16)).reshape(-1, 4, 4, 4)), nn.Conv1d(4, 4, 3, padding=1)


@op("conv_transpose2d", "linear.conv_transpose2d linear.conv_transpose2d_module pooling.avg_pool2d", linear=True)
def _(r):
    if r.random() < 0.5:
        return (lambda x, m: F.conv_transpose2d(x, m.w, stride=1, padding=1)), Const(w=_randn(r, 4, 4, 3, 3) / 3)
    layer = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=r.choice([1, 2]))
    return (lambda x, m: F.avg_pool2d(m(x), 2)), layer


@op("token_mixing", "linear.token_mixing_module shape.flatten shape.transpose shape.unflatten", linear=True)
def _(r):
    mix = cnn.TokenMixing(16)
    with torch.no_grad():
        mix.weight.add_(_randn(r, 16, 16) * 0.2)
    return (lambda x, m: m(x.flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(2, (4, 4))), mix


@op("token_mixing_residual", "linear.token_mixing_module shape.flatten shape.transpose shape.unflatten", linear=True)
def _(r):
    """``t + T t`` on tokens: the identity joins the token map conjugated by a transpose (exact fold)."""
    mix = cnn.TokenMixing(16, bias=r.random() < 0.5)
    with torch.no_grad():
        mix.weight.copy_(_randn(r, 16, 16) * r.choice([0.1, 0.5]))

    def residual(x, m):
        tokens = x.flatten(2).transpose(1, 2)
        return (tokens + m(tokens)).transpose(1, 2).unflatten(2, (4, 4))

    return residual, mix


@op("liresnet_block", "linear.liresnet_block_module", linear=True)
def _(r):
    block = cnn.LiResNetBlock(4)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(_randn(r, *p.shape) * 0.3)
    return (lambda x, m: m(x)), block


@op("linear_bottleneck", "linear.linear_bottleneck_module", linear=True)
def _(r):
    hidden = r.choice([1, 2, 3])
    middle = r.choice([(3, 1), (1, 0), (5, 2)])
    block = cnn.LinearBottleneck([nn.Conv2d(4, hidden, 1), nn.Conv2d(hidden, hidden, middle[0], padding=middle[1]),
                                  nn.Conv2d(hidden, 4, 1)])
    return (lambda x, m: m(x)), block


@op("projection_pool", "orthogonal.projection_pool_module")
def _(r):
    pool = cnn.ProjectionPool2d(4)
    with torch.no_grad():
        pool.angle.copy_(_randn(r, 2) * 2)
    return (lambda x, m: m[1](m[0](x))), nn.Sequential(pool, nn.Conv2d(2, 4, 1))


@op("soc", "orthogonal.soc_module")
def _(r):
    stride, out = r.choice([(1, 4), (1, 2), (2, 4), (2, 16)])
    layer = cnn.SOC(4, out, 3, stride=stride, train_terms=r.choice([1, 2, 4]), eval_terms=r.choice([1, 3, 6]),
                    max_norm=r.uniform(0.3, 1.5))
    with torch.no_grad():
        layer.weight.copy_(_randn(r, *layer.weight.shape) * r.uniform(0.1, 10))
        layer.bias.copy_(_randn(r, out))
    # back to 4 channels at the input's size, so the draw composes with the others
    restore = nn.Upsample(scale_factor=stride) if stride > 1 else nn.Identity()
    mix = nn.Conv2d(out, 4, 1)
    return (lambda x, m: m[2](m[1](m[0](x)))), nn.Sequential(layer, mix, restore)


@op("cholesky", "linear.cholesky_linear_module linear.cholesky_conv_module", linear=True)
def _(r):
    if r.random() < 0.5:
        # well-conditioned (V V^T far from singular): the float64 copy the tests differentiate
        # recomputes the factorisation, which agrees with the float32 one to about cond(V) x 1e-7
        layer = cnn.CholeskyLinear(64, 64, identity_init=True, init_scale=r.uniform(0.1, 1))
        restore = nn.Linear(layer.out_features, 64)  # back to the input's size, so the draw composes
        return (lambda x, m: m[1](m[0](x.flatten(1))).view(x.shape[0], 4, 4, 4)), nn.Sequential(layer, restore)
    conv = cnn.CholeskyConv2d(4, 4, patch_size=2, bias=True)
    with torch.no_grad():
        conv.weight.mul_(r.uniform(0.1, 3))
        conv.bias.copy_(_randn(r, 4))
    return (lambda x, m: m[1](m[0](x))), nn.Sequential(conv, nn.Upsample(scale_factor=2))


@op("bro", "orthogonal.bro_module", linear=True)
def _(r):
    layer = cnn.BRO(4, r.choice([1, 3]), rank=r.choice([1, 2, 3]))
    with torch.no_grad():  # around its initial selection: well-conditioned at every frequency
        layer.weight.add_(_randn(r, *layer.weight.shape) * r.uniform(0.01, 0.2))
        layer.bias.copy_(_randn(r, 4))
    return (lambda x, m: m(x)), layer


# -- normalisation -----------------------------------------------------------------------------
def _bn(r, layer):
    with torch.no_grad():
        layer.running_var.copy_(_randn(r, 4).abs() + 0.2)
        layer.running_mean.copy_(_randn(r, 4))
        layer.weight.copy_(_randn(r, 4))
    return layer.eval()


@op("batch_norm", "normalization.batch_norm_module normalization.batch_norm", linear=True)
def _(r):
    if r.random() < 0.5:
        return (lambda x, m: m(x)), _bn(r, nn.BatchNorm2d(4))
    return (lambda x, m: F.batch_norm(x, m.mean, m.var, m.w, None, False)), Const(
        mean=_randn(r, 4), var=_randn(r, 4).abs() + 0.3, w=_randn(r, 4))


@op("affine", "normalization.affine_module", linear=True)
def _(r):
    layer = cnn.Affine(4)
    with torch.no_grad():
        layer.weight.copy_(_randn(r, 4))
    return (lambda x, m: m(x)), layer


@op("batch_norm_act", "normalization.batch_norm_act_module")
def _(r):
    act = r.choice([nn.ReLU, nn.GELU, nn.Identity, nn.LeakyReLU])
    return (lambda x, m: m(x)), _bn(r, BatchNormAct2d(4, act_layer=act))


@op("dual_batch_norm_act", "normalization.batch_norm_act_module")
def _(r):
    # dpn68's DualPathBlock: two BatchNormAct2d with different scales read one input
    pair = nn.ModuleList([_bn(r, BatchNormAct2d(4)), _bn(r, BatchNormAct2d(4))])
    return (lambda x, m: m[0](x) + 3 * m[1](x)), pair


# -- pooling and resampling --------------------------------------------------------------------
@op("max_pool", "pooling.max_pool2d pooling.max_pool2d_with_indices pooling.max_pool2d_module")
def _(r):
    form = r.choice(["F", "indices", "module", "torch"])
    fns = {"F": lambda x, m: F.max_pool2d(x, 3, 1, 1), "indices": lambda x, m: F.max_pool2d(x, 3, 1, 1,
                                                                                           return_indices=True)[0],
           "module": lambda x, m: m(x), "torch": lambda x, m: torch.max_pool2d(x, 2, 1, 1)[:, :, :4, :4]}
    return fns[form], nn.MaxPool2d(3, 1, 1) if form == "module" else _id()


@op("adaptive_max_pool", "pooling.adaptive_max_pool2d pooling.adaptive_max_pool2d_with_indices "
                         "pooling.adaptive_max_pool2d_module pooling.interpolate")
def _(r):
    form = r.choice(["F", "indices", "module"])
    fns = {"F": lambda x, m: F.adaptive_max_pool2d(x, 2), "module": lambda x, m: m(x),
           "indices": lambda x, m: F.adaptive_max_pool2d(x, 2, return_indices=True)[0]}
    pool = fns[form]
    return (lambda x, m: F.interpolate(pool(x, m), scale_factor=2)), nn.AdaptiveMaxPool2d(2)


@op("avg_pool", "pooling.avg_pool2d pooling.avg_pool2d_module", linear=True)
def _(r):
    if r.random() < 0.5:
        return (lambda x, m: F.avg_pool2d(x, 3, 1, 1)), _id()
    return (lambda x, m: m(x)), nn.AvgPool2d(3, 1, 1)


@op("adaptive_avg_pool", "pooling.adaptive_avg_pool2d pooling.adaptive_avg_pool2d_module pooling.upsample_module",
    linear=True)
def _(r):
    mode = r.choice(["nearest", "bilinear"])
    up = nn.Upsample(size=(4, 4), mode=mode)
    size = r.choice([1, 2, 3])
    if r.random() < 0.5:
        return (lambda x, m: m(F.adaptive_avg_pool2d(x, size))), up
    pool = nn.AdaptiveAvgPool2d(3)
    return (lambda x, m: m[1](m[0](x))), nn.ModuleList([pool, up])


@op("interpolate", "pooling.interpolate", linear=True)
def _(r):
    mode = r.choice(["nearest", "nearest-exact", "bilinear", "area"])
    align = r.choice([None, True]) if mode == "bilinear" else None
    return (lambda x, m: F.interpolate(F.interpolate(x, size=(6, 5), mode=mode, align_corners=align), size=(4, 4),
                                       mode=mode, align_corners=align)), _id()


@op("unfold", "pooling.unfold linear.linear_module shape.flatten shape.view", linear=True)
def _(r):
    return (lambda x, m: m(F.unfold(x, 2).flatten(1)).view(-1, 4, 4, 4)), nn.Linear(16 * 9, 64)


@op("reduce", "pooling.reduce", linear=True)
def _(r):
    form = r.choice(["mean", "sum", "method"])
    fns = {"mean": lambda x, m: x + torch.mean(x, dim=(2, 3), keepdim=True),
           "sum": lambda x, m: x - torch.sum(x, 1, keepdim=True), "method": lambda x, m: x + x.mean(-1, keepdim=True)}
    return fns[form], _id()


# -- shape -------------------------------------------------------------------------------------
@op("reshapes", "shape.view shape.reshape shape.flatten shape.squeeze shape.unsqueeze shape.unflatten shape.view_as "
                "shape.flatten_module", linear=True)
def _(r):
    form = r.choice(["view", "reshape", "squeeze", "unflatten", "view_as", "module"])
    fns = {"view": lambda x, m: 2 * x.reshape(-1, 64).view(-1, 4, 4, 4),
           "reshape": lambda x, m: torch.reshape(x.reshape(x.shape[0], 16, 4), (-1, 4, 4, 4)),
           "squeeze": lambda x, m: torch.squeeze(x.unsqueeze(1), 1) + x.unsqueeze(-1).squeeze(-1),
           "unflatten": lambda x, m: torch.flatten(x, 1).unflatten(1, (4, 4, 4)),
           "view_as": lambda x, m: x.flatten(2).view_as(x) + x.flatten(1).reshape_as(x),
           "module": lambda x, m: m[1](m[0](x))}
    return fns[form], nn.ModuleList([nn.Flatten(), nn.Unflatten(1, (4, 4, 4))])


@op("permutes", "shape.permute shape.permute_method shape.transpose shape.movedim", linear=True)
def _(r):
    form = r.choice(["permute", "method", "transpose", "movedim", "swap"])
    fns = {"permute": lambda x, m: torch.permute(x, (0, 1, 3, 2)),
           "method": lambda x, m: x.permute(0, 2, 3, 1).permute([0, 3, 1, 2]).transpose(2, 3),
           "transpose": lambda x, m: torch.transpose(x, 1, 3),
           "movedim": lambda x, m: torch.movedim(x, 1, 3) + x.moveaxis(2, 3),
           "swap": lambda x, m: x.swapaxes(1, 2) + torch.swapdims(x, 2, 3)}
    return fns[form], _id()


@op("index", "shape.getitem shape.cat", linear=True)
def _(r):
    form = r.choice(["slice", "ellipsis", "none", "advanced", "int"])
    fns = {"slice": lambda x, m: torch.cat([x[:, :, 1:], 3 * x[:, :, :1]], 2),
           "ellipsis": lambda x, m: torch.cat([x[..., 2:], x[..., :2]], -1),
           "none": lambda x, m: x[:, None, :, :][:, 0],
           "advanced": lambda x, m: x[:, m.idx] + x[:, :, m.idx],
           "int": lambda x, m: torch.cat([x[:, i:i + 1] * (i + 1) for i in range(4)], 1)}
    return fns[form], Const(idx=torch.tensor([0, 0, 3, 1]))


@op("splits", "shape.chunk shape.split shape.unbind shape.cat shape.concatenate shape.stack shape.getitem",
    linear=True)
def _(r):
    form = r.choice(["chunk", "split", "unbind", "concatenate", "method"])

    def unbind(x, m):
        a, b, c, d = x.unbind(1)
        return torch.stack([d, 2 * a, b, c], 1)

    fns = {"chunk": lambda x, m: torch.cat(x.chunk(2, 1)[::-1], 1) + 3 * torch.chunk(x, 4, 2)[1].repeat(1, 1, 4, 1),
           "split": lambda x, m: torch.cat(torch.split(x, [1, 3], 1)[::-1], 1),
           "unbind": unbind,
           "concatenate": lambda x, m: torch.concatenate([x[:, 2:], x[:, :2]], axis=1),
           "method": lambda x, m: torch.cat([x.split(2, 3)[1], 5 * x.chunk(2, 3)[0]], 3)}
    return fns[form], _id()


@op("expands", "shape.expand shape.expand_as shape.broadcast_to", linear=True)
def _(r):
    form = r.choice(["expand", "expand_as", "broadcast", "const_expand_as"])
    fns = {"expand": lambda x, m: x[:, :1].expand(-1, 4, -1, -1),
           "expand_as": lambda x, m: x[:, :, :1].expand_as(x) + x,
           "broadcast": lambda x, m: torch.broadcast_to(x.mean(1, keepdim=True), (x.shape[0], 4, 4, 4)),
           "const_expand_as": lambda x, m: x + m.c.expand_as(x)}
    return fns[form], Const(c=_randn(r, 1, 4, 1, 1))


@op("pad", "shape.pad shape.pad_module", linear=True)
def _(r):
    value = r.uniform(-1, 1)
    if r.random() < 0.5:
        return (lambda x, m: F.pad(F.pad(x, (1, 1, 2, 1), value=value), (-1, -1, -1, -1))[:, :, 1:]), _id()
    return (lambda x, m: m(x)[:, :, 1:5, 2:6]), r.choice([nn.ZeroPad2d(2), nn.ConstantPad2d(2, 0.5)])


@op("copies", "shape.flip shape.flip_method shape.roll shape.repeat shape.getitem", linear=True)
def _(r):
    form = r.choice(["flip", "method", "roll", "repeat"])
    fns = {"flip": lambda x, m: x + torch.flip(x, (2, 3)), "method": lambda x, m: x.flip(1) - x.flip([3]),
           "roll": lambda x, m: torch.roll(x, (1, -2), (2, 3)) + x.roll(1, 1),
           "repeat": lambda x, m: x.repeat(1, 2, 1, 1)[:, 1:5] + x.repeat(1, 1, 1, 2)[..., 3:7]}
    return fns[form], _id()


@op("pixel_shuffle", "shape.pixel_shuffle shape.pixel_unshuffle shape.pixel_shuffle_module "
                     "shape.pixel_unshuffle_module", linear=True)
def _(r):
    if r.random() < 0.5:
        return (lambda x, m: F.pixel_unshuffle(F.pixel_shuffle(x, 2).flip(3), 2)), _id()
    return (lambda x, m: m[1](m[0](x).roll(1, 2))), nn.ModuleList([nn.PixelShuffle(2), nn.PixelUnshuffle(2)])


@op("detach", "shape.detach", linear=True, autograd=False)
def _(r):
    return (lambda x, m: 2 * x.detach() - x), _id()


@op("identities", "shape.contiguous shape.clone shape.cast shape.to shape.type_as shape.type_ "
                  "shape.identity_module", linear=True)
def _(r):
    form = r.choice(["contiguous", "clone", "cast", "to", "type", "identity"])
    fns = {"contiguous": lambda x, m: x.transpose(2, 3).contiguous(), "clone": lambda x, m: x.clone() + torch.clone(x),
           "cast": lambda x, m: x.double().float().to(x.dtype),
           "to": lambda x, m: x.to(torch.float64).to(x.dtype), "type": lambda x, m: x.type(torch.float64).type_as(x),
           "identity": lambda x, m: m(x)}
    return fns[form], nn.Identity()


@op("dropout_eval", "shape.dropout shape.dropout_module shape.drop_path_module", linear=True)
def _(r):
    form = r.choice(["F", "module", "drop_path"])
    if form == "F":
        return (lambda x, m: F.dropout(x, 0.5, training=False) + F.dropout2d(x, 0.2, False)), _id()
    return (lambda x, m: m(x)), (nn.Dropout(0.3) if form == "module" else DropPath(0.2)).eval()


# -- drawing graphs ----------------------------------------------------------------------------
class Drawn(nn.Module):
    """A chain of vocabulary ops (some residual) and a dense head to ``CLASSES`` logits."""

    def __init__(self, ops: list[Op], seed: int) -> None:
        super().__init__()
        r = random.Random(seed)
        self.names = [o.name for o in ops]
        built = [o.build(r) for o in ops]
        self.fns = [fn for fn, _ in built]
        self.mods = nn.ModuleList([m for _, m in built])
        self.residual = [r.choice([0.0, 0.0, r.uniform(-1, 1)]) for _ in ops]
        self.head = nn.Linear(64, CLASSES)
        with torch.no_grad():
            self.head.weight.mul_(r.uniform(0.5, 4))

    def forward(self, x):
        for fn, mod, res in zip(self.fns, self.mods, self.residual):
            y = fn(x, mod)
            x = y + res * x if res else y
        return self.head(x.flatten(1))


def draw(index: int, seed: int, length: tuple[int, int] = (1, 4), linear_only: bool = False) -> Drawn:
    """Graph ``index``: vocabulary op ``index`` (so every op is drawn) plus random others."""
    r = random.Random(seed * 100_003 + index)
    pool = [o for o in VOCABULARY if o.linear] if linear_only else [o for o in VOCABULARY if o.autograd]
    first = pool[index % len(pool)]
    ops = [first] + [r.choice(pool) for _ in range(r.randint(*length) - 1)]
    r.shuffle(ops)
    return Drawn(ops, seed * 7919 + index).eval()


# -- what must be refused ----------------------------------------------------------------------
class _Single(nn.Module):
    def __init__(self, fn, mod=None) -> None:
        super().__init__()
        self.fn, self.mod, self.head = fn, mod if mod is not None else nn.Identity(), nn.Linear(64, CLASSES)

    def forward(self, x):
        return self.head(self.fn(x, self.mod).reshape(x.shape[0], -1)[:, :64])


def _hooked_linear():
    layer = nn.Linear(64, 64)
    layer.register_forward_hook(lambda m, i, o: o * 100)
    return layer


def _reads_after_write(x, m):
    y = x * 1.0
    z = y.relu_()
    return z + (-y).relu()


def _reads_after_inplace_module(x, m):
    y = 2 * x
    m(y)
    return y - x


#: (name, model, rule it exercises or None) for models that must be refused with a CertifyFxError.
REFUSALS: list[tuple[str, Callable[[], nn.Module], str | None]] = [
    ("layer_norm_module", lambda: _Single(lambda x, m: m(x), nn.LayerNorm([4, 4, 4])), "refusals.normalization_module"),
    ("group_norm", lambda: _Single(lambda x, m: F.group_norm(x, 2)), "refusals.normalization"),
    ("normalize", lambda: _Single(lambda x, m: F.normalize(x, dim=1)), "refusals.normalize"),
    ("fft_modulus", lambda: _Single(lambda x, m: torch.fft.irfft2(torch.fft.rfft2(x).abs(), s=(4, 4))), None),
    ("fft_product", lambda: _Single(lambda x, m: torch.fft.irfft2(torch.fft.rfft2(x) ** 2, s=(4, 4))), None),
    ("attention", lambda: _Single(lambda x, m: m(x.flatten(2), x.flatten(2), x.flatten(2))[0],
                                  nn.MultiheadAttention(16, 1, batch_first=True)), "refusals.attention_module"),
    ("sdpa", lambda: _Single(lambda x, m: F.scaled_dot_product_attention(x, x, x)), "refusals.attention"),
    ("einsum", lambda: _Single(lambda x, m: torch.einsum("bchw,bchw->bchw", x, x)), "refusals.attention"),
    ("lstm", lambda: _Single(lambda x, m: m(x.flatten(2))[0], nn.LSTM(16, 16, batch_first=True)),
     "refusals.recurrent_module"),
    ("product", lambda: _Single(lambda x, m: x * x.sigmoid()), "linear.mul"),
    ("addcmul_product", lambda: _Single(lambda x, m: torch.addcmul(x, x, x.sigmoid())), "linear.addcmul"),
    ("matmul_qk", lambda: _Single(lambda x, m: x @ x.transpose(2, 3)), "linear.matmul"),
    ("div_by_input", lambda: _Single(lambda x, m: x / (x.abs() + 1)), "linear.div"),
    ("sub_tensor_alpha", lambda: _Single(lambda x, m: torch.sub(x, x, alpha=torch.tensor(2.0))), "linear.sub"),
    ("clamp_input_min", lambda: _Single(lambda x, m: torch.clamp(x, min=10 * x)), "activations.clamp"),
    ("clip_input_max", lambda: _Single(lambda x, m: torch.clip(x, max=-4 * x)), "activations.clamp"),
    ("linear_input_bias", lambda: _Single(lambda x, m: F.linear(x.flatten(1), torch.eye(64), bias=3 * x.flatten(1))),
     "linear.linear"),
    ("softplus_jump", lambda: _Single(lambda x, m: m(x), nn.Softplus(threshold=0.0)), "activations.softplus_module"),
    ("softplus_jump_F", lambda: _Single(lambda x, m: F.softplus(x, 1.0, 1.0)), "activations.softplus"),
    ("celu_negative", lambda: _Single(lambda x, m: F.celu(x, -1.0)), "activations.celu"),
    ("celu_module_negative", lambda: _Single(lambda x, m: m(x), nn.CELU(-0.5)), "activations.celu_module"),
    ("softmax_batch", lambda: _Single(lambda x, m: F.softmax(x, dim=0)), None),
    ("softmax_no_dim", lambda: _Single(lambda x, m: m(x), nn.Softmax()), "activations.softmax_module"),
    ("sum_batch", lambda: _Single(lambda x, m: x - x.sum(0, keepdim=True)), None),
    ("mean_all", lambda: _Single(lambda x, m: x - x.mean()), "pooling.reduce"),
    ("amax_all", lambda: _Single(lambda x, m: x - torch.amax(x)), "activations.amax"),
    ("max_all", lambda: _Single(lambda x, m: x - x.max()), "activations.max_"),
    ("where_other_branch", lambda: _Single(lambda x, m: torch.where(x > 0, x, -x)), "activations.where"),
    ("comparison_read", lambda: _Single(lambda x, m: x * (x > 0)), "activations.comparison"),
    ("max_indices", lambda: _Single(lambda x, m: x + x.max(1, keepdim=True)[1].float()), "shape.getitem"),
    ("sort_indices", lambda: _Single(lambda x, m: x.sort(1).indices.float()), "shape.getattr_"),
    ("pool_indices", lambda: _Single(lambda x, m: F.max_pool2d(x, 3, 1, 1, return_indices=True)[1].float()),
     "shape.getitem"),
    ("flip_batch", lambda: _Single(lambda x, m: x.flip(0)), None),
    ("roll_flat", lambda: _Single(lambda x, m: x.roll(3)), "shape.roll"),
    ("cat_batch", lambda: _Single(lambda x, m: torch.cat([x, x], 0)), None),
    ("permute_batch", lambda: _Single(lambda x, m: x.permute(1, 0, 2, 3)), None),
    ("index_batch", lambda: _Single(lambda x, m: x[[1, 0, 1]]), None),
    ("interpolate_bicubic", lambda: _Single(lambda x, m: F.interpolate(x, scale_factor=2, mode="bicubic")),
     "pooling.interpolate"),
    ("dropout_training", lambda: _Single(lambda x, m: F.dropout(x, 0.5)), "shape.dropout"),
    ("dropout_module_training", lambda: _Single(lambda x, m: m(x), nn.Dropout(1.0).train()), "shape.dropout_module"),
    ("batch_norm_training", lambda: _Single(lambda x, m: m(x), nn.BatchNorm2d(4).train()),
     "normalization.batch_norm_module"),
    ("cast_half", lambda: _Single(lambda x, m: x.half().float()), "shape.cast"),
    ("cast_bfloat16", lambda: _Single(lambda x, m: x.to(torch.bfloat16).float()), "shape.to"),
    ("cast_int", lambda: _Single(lambda x, m: x.to(torch.int32).float()), "shape.to"),
    ("view_dtype", lambda: _Single(lambda x, m: x.view(torch.int32).float()), "shape.view"),
    ("round", lambda: _Single(lambda x, m: torch.round(x)), None),
    ("compare", lambda: _Single(lambda x, m: (x > 0).float()), None),
    ("hook_leaf", lambda: _Single(lambda x, m: m(x.flatten(1)), _hooked_linear()), None),
    ("inplace_reread", lambda: _Single(_reads_after_write), None),
    ("inplace_module_reread", lambda: _Single(_reads_after_inplace_module, nn.ReLU(inplace=True)), None),
    ("inplace_on_input", lambda: _Single(lambda x, m: x.relu_()), None),
    ("random", lambda: _Single(lambda x, m: x + torch.randn_like(x)), None),
    ("random_shape", lambda: _Single(lambda x, m: x + torch.randn(x.shape)), None),
    ("out_kwarg", lambda: _Single(lambda x, m: torch.add(x, 1.0, out=torch.empty(2, 4, 4, 4))), None),
    ("tuple_output", lambda: _TupleOut(), None),
]


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x):
        return self.fc(x.flatten(1)), x


# -- what a rule must not trust (a rule covers its exact type; a forward is one pure function) ----
#: methods a rule could rely on besides ``forward``: a subclass that overrides one changes the map
_OVERRIDABLE = ("forward", "_conv_forward", "theta", "expand", "skew_kernel", "normalized_weight", "folded_weight")


def _scaled_output(value, factor: float):
    if isinstance(value, torch.Tensor):
        return value * factor
    if isinstance(value, tuple):
        return tuple(_scaled_output(v, factor) for v in value)
    return value


def subclass_with_override(cls: type, method: str, factor: float) -> type:
    """A subclass of ``cls`` whose ``method`` returns its tensors scaled by ``factor``."""
    original = getattr(cls, method)

    def overridden(self, *args, **kwargs):
        return _scaled_output(original(self, *args, **kwargs), factor)

    return type(f"Scaled{cls.__name__}", (cls,), {method: overridden})


def subclassed(model: nn.Module, r: random.Random) -> nn.Module | None:
    """A copy of ``model`` where every module of a type with a rule is an instance of a subclass
    overriding one of the methods it has (``forward``, ``_conv_forward``, ``theta``, ...); None if
    the model has no such module."""
    from certify_fx.bounds import registry

    model = copy.deepcopy(model)
    swapped = False
    for module in model.modules():
        cls = type(module)
        if registry.module_rule(module) is None or module is model:
            continue
        method = r.choice([m for m in _OVERRIDABLE if callable(getattr(cls, m, None))])
        module.__class__ = subclass_with_override(cls, method, r.choice([0.25, 3.0]))
        swapped = True
    return model if swapped else None


def _conv_variants() -> list[tuple[str, Callable[[], nn.Module]]]:
    """Every kind of conv a block may hold: each attribute that changes the map, transposition,
    and a subclass that scales its output."""
    scaled = subclass_with_override(nn.Conv2d, "_conv_forward", 3.0)
    return [
        ("plain", lambda: nn.Conv2d(4, 4, 3, padding=1)),
        ("circular", lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")),
        ("replicate", lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")),
        ("reflect", lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
        ("dilation", lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2)),
        ("groups", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2)),
        ("stride", lambda: nn.Conv2d(4, 4, 3, padding=1, stride=2)),
        ("pointwise", lambda: nn.Conv2d(4, 4, 1)),
        ("transposed", lambda: nn.ConvTranspose2d(4, 4, 3, padding=1)),
        ("subclass", lambda: scaled(4, 4, 3, padding=1)),
    ]


class _WithHead(nn.Module):
    """``body`` followed by a dense head to ``CLASSES`` logits."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(64, CLASSES)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def container_variants() -> list[tuple[str, Callable[[], nn.Module]]]:
    """LiResNetBlock and LinearBottleneck holding each conv variant (with random weights)."""
    cases = []
    for name, conv in _conv_variants():
        def liresnet(conv=conv):
            block = cnn.LiResNetBlock(4)
            block.conv = conv()
            return _WithHead(block)

        cases.append((f"liresnet_block_{name}", liresnet))
        cases.append((f"linear_bottleneck_{name}", lambda conv=conv: _WithHead(cnn.LinearBottleneck([conv(), conv()]))))
    return cases


class _BatchValue(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.head, self.cls = fn, nn.Linear(64, CLASSES), nn.Parameter(torch.randn(1, 1, 16))

    def forward(self, x):
        return self.fn(x, self.head(x.flatten(1)), self)


#: values read from the batch size: each must be refused (True) or is a size only (False)
BATCH_VALUES: list[tuple[str, Callable, bool]] = [
    ("times_batch", lambda x, y, m: y * x.shape[0], True),
    ("times_size0", lambda x, y, m: y * x.size(0), True),
    ("times_size", lambda x, y, m: y * x.size()[0], True),
    ("times_numel", lambda x, y, m: y * (x.numel() / 64), True),
    ("times_last_dim_of_batch", lambda x, y, m: y * x.shape[-4], True),
    ("plus_arange", lambda x, y, m: y + torch.arange(x.shape[0])[:, None], True),
    ("over_ones_sum", lambda x, y, m: y / x.new_ones(x.shape[0]).sum(), True),
    ("batch_condition", lambda x, y, m: y * (1 + 10 * (x.shape[0] == 1)), True),
    ("cat_scaled_rows", lambda x, y, m: torch.cat([y, torch.arange(x.shape[0]).float()[:, None]], 1), True),
    ("expand_times_arange", lambda x, y, m: torch.cat(
        [m.cls.expand(x.shape[0], -1, -1) * torch.arange(x.shape[0]).view(-1, 1, 1), x.flatten(2)], 1)
        .flatten(1)[:, :64] @ m.head.weight.T, True),
    ("broadcast_of_a_batch_reduction", lambda x, y, m: y * (1 + 100 * (torch.ones_like(y)[:, :1].cumsum(0) > 5)
                                                            .any(0, keepdim=True).expand(x.shape[0], 1).float()), True),
    ("view_batch", lambda x, y, m: y.view(x.shape[0], -1), False),
    ("reshape_size", lambda x, y, m: y.reshape(x.size(0), CLASSES), False),
    ("over_channels", lambda x, y, m: y / x.shape[1], False),
    ("over_last_dim", lambda x, y, m: y / x.shape[-1], False),
    ("cat_new_zeros", lambda x, y, m: torch.cat([y, x.new_zeros(x.shape[0], 1)], 1), False),
    ("cat_zeros_like", lambda x, y, m: torch.cat([y, torch.zeros_like(y)[:, :1]], 1), False),
    ("cls_token", lambda x, y, m: torch.cat([m.cls.expand(x.shape[0], -1, -1), x.flatten(2)], 1)
        .flatten(1)[:, :64] @ m.head.weight.T, False),
]


def batch_value_model(fn) -> nn.Module:
    return _BatchValue(fn).eval()


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class _ScaledByCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = 1

    def forward(self, x):
        self.k = self.k + 1
        return x * self.k


class _BufferCounter(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.register_buffer("k", torch.ones(()))

    def forward(self, x):
        if self.inplace:
            self.k += 1
        else:
            self.k = self.k + 1
        return x * self.k


class _PythonRandom(nn.Module):
    def forward(self, x):
        return x * (1 + random.random())


class _PythonTime(nn.Module):
    """A value read once at tracing (from a Python attribute changed between calls elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.state = [1.0]

    def forward(self, x):
        self.state[0] += 1.0
        return x * self.state[0]


class CachedWeight(nn.Module):
    """Caches its normalised weight on the first call, as public Lipschitz-network code does."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            self.cache = self.weight / self.weight.norm()
        return F.conv2d(x, self.cache[:, :, None, None])


#: forwards that change state or are not one function: (name, model, the attribute named or None)
STATEFUL: list[tuple[str, Callable[[], nn.Module], str | None]] = [
    ("counter", lambda: _WithHead(_Counter()), "body.calls"),
    ("scaled_by_calls", lambda: _WithHead(_ScaledByCalls()), "body.k"),
    ("buffer_counter", lambda: _WithHead(_BufferCounter(False)), "body.k"),
    ("buffer_counter_inplace", lambda: _WithHead(_BufferCounter(True)), "body.k"),
    ("python_random", lambda: _WithHead(_PythonRandom()), None),
    ("python_list_state", lambda: _WithHead(_PythonTime()), None),
]


def instance_override(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose modules with a rule get an instance-level ``forward`` that scales."""
    from certify_fx.bounds import registry

    model = copy.deepcopy(model)
    swapped = False
    for module in model.modules():
        if module is not model and registry.module_rule(module) is not None:
            forward = module.forward
            module.forward = lambda *a, _f=forward, **k: _scaled_output(_f(*a, **k), 3.0)
            swapped = True
    return model if swapped else None
