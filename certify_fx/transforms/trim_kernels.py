"""Pass: drop the kernel taps of a convolution that only ever read zero padding. Exact.

On a small feature map a large kernel mostly multiplies padding: a 5x5 conv with padding 2 on a
1x1 map reads its input only through the centre tap, and a 7x7 stride-2 transition on a 2x2 map
through a 2x2 window. Such taps never change an output and never receive a gradient, but cost
their full share of every forward and backward (a converted resnet18 at 28x28 spent most of its
step there). Trimmed (:meth:`certify_fx.bounds.operators.Conv2d.trimmed`), the conv computes the
same outputs with the taps that matter; its bound is unchanged (the same operator).

Touched: every ``nn.Conv2d`` with zero padding and dilation 1 that sees one input size (inside
LiResNet and factored blocks too), with the ``nn.ZeroPad2d`` in front of it if it has one; the
padding left over goes back into the conv where it is symmetric, else into the pad.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..bounds.operators import Conv2d as ConvOp
from .log import log_rewrite
from .passes import Option, conversion_pass

__all__ = ["TRIM", "forward_cost", "trim_kernels"]

TRIM = Option("trim", True, None, "drop kernel taps that only ever read zero padding (exact; a 5x5 conv on a 1x1 "
              "map becomes 1x1)")


def _operator(conv: nn.Conv2d, size: tuple[int, int], extra: tuple[int, int, int, int] = (0, 0, 0, 0)) -> ConvOp | None:
    """``conv`` (after a zero padding ``extra``: top, bottom, left, right) as a bound operator."""
    if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or isinstance(conv.padding, str):
        return None
    ph, pw = conv.padding
    t, b, l, r = extra
    return ConvOp((conv.in_channels, *size), conv.weight.detach(), tuple(conv.stride), (t + ph, b + ph, l + pw, r + pw),
                  groups=conv.groups)


def forward_cost(convs: list[nn.Module], size: tuple[int, int]) -> int:
    """Multiply-adds per example of ``convs`` (zero pads allowed between them) applied in a chain to
    a map of ``size``, counting only the kernel taps that read the input (what this pass leaves)."""
    cost = 0
    for conv in convs:
        if type(conv) is nn.ZeroPad2d:
            left, right, top, bottom = conv.padding
            size = (size[0] + top + bottom, size[1] + left + right)
            continue
        op = _operator(conv, size)
        if op is None:
            raise ValueError(f"forward_cost takes zero-padded, undilated convs; got {conv}")
        kept = op.trimmed().weight
        cost += kept[0].numel() * conv.out_channels * op.out_shape[1] * op.out_shape[2]
        size = op.out_shape[1:]
    return cost


def _input_sizes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[nn.Module, set[tuple[int, int]]]:
    sizes: dict[nn.Module, set[tuple[int, int]]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.setdefault(m, set()).add(tuple(args[0].shape[-2:])))
             for m in gm.modules() if type(m) in (nn.Conv2d, nn.ZeroPad2d)]
    try:
        with torch.no_grad():
            gm(torch.zeros(1, *input_shape, dtype=next(gm.parameters()).dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def _pads_in_front(gm: fx.GraphModule) -> dict[nn.Conv2d, nn.ZeroPad2d]:
    """Convs fed only by a zero pad that feeds nothing else."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.Conv2d or not node.args:
            continue
        before = node.args[0]
        if isinstance(before, fx.Node) and before.op == "call_module" and len(before.users) == 1 and \
                type(gm.get_submodule(before.target)) is nn.ZeroPad2d:
            found[gm.get_submodule(node.target)] = gm.get_submodule(before.target)
    return found


@conversion_pass(changes_function=False, enabled_by=TRIM,
                 after=("linearize_residual_branches", "fold_linear_chains", "fold_linear_residuals"))
@torch.no_grad()
def trim_kernels(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Trim every conv whose kernel has taps that only read padding (see the module docstring)."""
    names = {m: name for name, m in gm.named_modules()}
    sizes = _input_sizes(gm, input_shape)
    pads = _pads_in_front(gm)
    for conv, seen in sizes.items():
        if type(conv) is not nn.Conv2d or len(seen) != 1:
            continue
        pad = pads.get(conv)
        if pad is not None and len(sizes.get(pad, ())) == 1 and all(p >= 0 for p in pad.padding):
            (size,), (left, right, top, bottom) = sizes[pad], pad.padding
            op = _operator(conv, size, (top, bottom, left, right))
        else:
            pad, (size,) = None, seen
            op = _operator(conv, size)
        trimmed = op.trimmed() if op is not None else None
        if trimmed is None or trimmed is op or min(trimmed.padding) < 0:
            continue
        t, b, l, r = trimmed.padding
        if pad is None and (t != b or l != r):
            continue  # the dead taps sit on one side: trimming would need a pad in front
        before = f"Conv2d {conv.kernel_size[0]}x{conv.kernel_size[1]}"
        conv.weight = nn.Parameter(trimmed.weight.clone())
        conv.kernel_size = tuple(trimmed.weight.shape[-2:])
        if t == b and l == r:
            conv.padding = (t, l)
            if pad is not None:
                pad.padding = (0, 0, 0, 0)
        else:
            conv.padding, pad.padding = (0, 0), (l, r, t, b)
        log_rewrite(gm, "trim_kernels", names[conv], before,
                    f"Conv2d {conv.kernel_size[0]}x{conv.kernel_size[1]} (on a {size[0]}x{size[1]} map)", False)
    return gm
