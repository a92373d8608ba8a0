"""Pass: residual blocks with nonlinear branches become LiResNet blocks. Changes the function.

For ``y = x + g(x)`` the bound ``1 + ||g||`` is loose; LiResNet makes the branch linear so the
whole block is one exactly-bounded operator (Hu et al., 2023). This pass removes the activations
inside each residual branch, folds its BatchNorm/Affine layers and composes its convolutions into
the single equivalent conv (a bottleneck 1x1∘3x3∘1x1 becomes one 3x3, two 3x3 convs one 5x5;
composition ignores the zero padding between them, so borders change). Then

* an identity-shortcut block becomes ``LinearBottleneck`` when keeping the branch's convs costs
  fewer multiply-adds than the composed conv (a bottleneck 1x1-3x3-1x1; two 3x3 convs on large
  maps): the convs as they are (BatchNorm folded in), with all the zero padding moved onto
  the first one so that the chain is exactly the composed conv and is bounded as exactly; else
  ``LiResNetBlock`` (``x + beta/sqrt(L) * Conv(x)``) with the composed conv and ``beta = sqrt(L)``,
  so it equals ``x + Conv(x)`` (``bottleneck="auto"``, the default; ``"composed"`` or
  ``"factored"`` force one form);
* a downsampling block (strided or projection shortcut) becomes a ``LinearBottleneck`` with the
  shortcut conv when that costs fewer multiply-adds, else one strided transition conv, the sum of the
  shortcut and the branch;
* token blocks (ViT MLPs) just lose their activations; the folding passes then make
  ``x + fc2(fc1(x))`` one dense layer.

If the block's output is not already followed by an activation, a MinMax is inserted, so each
block is ``act(x + linear(x))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..bounds.operators import Conv2d as ConvOp
from ..bounds.operators import add as add_operators
from ..nn import Affine, LinearBottleneck, LiResNetBlock, TokenMixing
from .fold_linear_residuals import is_add
from .graph import (add_submodule, drop_passthrough, finalize, is_activation, is_linear_unit,
                    module_for, single_input, tensor_args)
from .log import log_rewrite
from .passes import Option, conversion_pass
from .replace_activations import ACTIVATION, sorting_activation
from .trim_kernels import forward_cost

__all__ = ["linearize_residual_branches"]


@dataclass
class _Affine:
    """An affine conv map ``x -> conv(x, weight, stride, padding) + bias`` (dense groups, dilation 1)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    padding: int

    @staticmethod
    def identity(channels: int) -> "_Affine":
        return _Affine(torch.eye(channels)[:, :, None, None], torch.zeros(channels), 1, 0)

    def then(self, other: "_Affine") -> "_Affine":
        """``other o self``: kernel taps of ``other`` at stride ``self.stride`` over ``self``'s kernel."""
        weight = F.conv_transpose2d(other.weight, self.weight, stride=self.stride)
        bias = other.bias + other.weight.sum((2, 3)) @ self.bias
        return _Affine(weight, bias, self.stride * other.stride, self.padding + self.stride * other.padding)

    def scaled(self, scale: torch.Tensor, shift: torch.Tensor) -> "_Affine":
        return _Affine(self.weight * scale.view(-1, 1, 1, 1), self.bias * scale + shift, self.stride, self.padding)


def _unit_map(gm: fx.GraphModule, node: fx.Node) -> _Affine | tuple[torch.Tensor, torch.Tensor] | None:
    """A conv-like unit as an _Affine, a per-channel unit as (scale, shift), else None."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    if isinstance(m, nn.Conv2d):
        if m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str) or \
                m.stride[0] != m.stride[1] or m.padding[0] != m.padding[1] or m.kernel_size[0] != m.kernel_size[1]:
            return None
        weight = m.weight.detach()
        if m.groups > 1:
            weight = ConvOp((m.in_channels, 1, 1), weight, groups=m.groups).dense_weight()
        bias = m.bias.detach() if m.bias is not None else torch.zeros(m.out_channels)
        return _Affine(weight.clone(), bias.clone(), m.stride[0], m.padding[0])
    if isinstance(m, Affine) and m.dim == 1:
        return m.weight.detach(), (m.bias.detach() if m.bias is not None else torch.zeros_like(m.weight))
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.running_var is not None:
        scale = torch.rsqrt(m.running_var + m.eps) * (m.weight.detach() if m.weight is not None else 1)
        return scale, (m.bias.detach() if m.bias is not None else 0) - m.running_mean * scale
    if isinstance(m, nn.AvgPool2d) and not m.padding:
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        c, size = node.meta["shape"][1], node.args[0].meta["shape"][-1]
        if node.meta["shape"][-1] != (size - k) // s + 1:  # ceil_mode added a partial window
            return None
        return _Affine(torch.eye(c)[:, :, None, None].expand(c, c, k, k) / (k * k), torch.zeros(c), s, 0)
    return None


def _compose(gm: fx.GraphModule, units: list[fx.Node], channels: int) -> _Affine | None:
    current = _Affine.identity(channels)
    for node in units:
        unit = _unit_map(gm, node)
        if unit is None:
            return None
        current = current.then(unit) if isinstance(unit, _Affine) else current.scaled(*unit)
    return current


def _chain(gm: fx.GraphModule, start: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
    """Walk back from ``start`` through single-input, single-user branch nodes; (nodes, where it stops)."""
    chain, node = [], start
    while len(node.users) == 1 and (is_linear_unit(gm, node) or is_activation(gm, node) or _is_token_mixing(gm, node)):
        chain.append(node)
        nxt = single_input(node)
        if nxt is None:
            return chain, None
        node = nxt
    return chain, node


def _is_token_mixing(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), TokenMixing)


@dataclass
class _Block:
    add: fx.Node
    source: fx.Node
    branch: list[fx.Node]  # nearest the add first
    shortcut: list[fx.Node]


def _find_blocks(gm: fx.GraphModule) -> list[_Block]:
    blocks = []
    for node in gm.graph.nodes:
        if not is_add(node):
            continue
        args = tensor_args(node)
        if len(args) != 2:
            continue
        walks = [_chain(gm, a) for a in args]
        (c0, e0), (c1, e1) = walks
        if e0 is None or e0 is not e1:
            continue
        acts = [any(is_activation(gm, n) for n in c) for c in (c0, c1)]
        if acts[0] == acts[1]:
            continue  # both linear (left to fold_linear_residuals) or both nonlinear
        branch, shortcut = (c0, c1) if acts[0] else (c1, c0)
        blocks.append(_Block(node, e0, branch, shortcut))
    return blocks


def _conv_module(weight, bias, stride, padding) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride, padding)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


BOTTLENECK_FORMS = ("auto", "composed", "factored")
BOTTLENECK = Option("bottleneck", "auto", BOTTLENECK_FORMS,
                    "a bottleneck branch's convs: auto (factored when that has fewer parameters), composed or factored")


def _factored(gm: fx.GraphModule, units: list[fx.Node], channels: int) -> list[_Affine] | None:
    """The branch as one affine conv per conv unit (per-channel units folded into their conv)."""
    segments: list[list[fx.Node]] = []
    seen_conv = False
    for node in units:  # a new segment at every conv after the first
        is_conv = isinstance(_unit_map(gm, node), _Affine)
        if not segments or (is_conv and seen_conv):
            segments.append([node])
        else:
            segments[-1].append(node)
        seen_conv = seen_conv or is_conv
    maps, width = [], channels
    for segment in segments:
        current = _compose(gm, segment, width)
        if current is None:
            return None
        maps.append(current)
        width = current.weight.shape[0]
    return maps


def _padding_first(maps: list[_Affine], padding: int) -> list[_Affine]:
    """The chain with all of its zero padding on its first conv that is not a stride-1 pointwise
    one, and none after: then every conv after it reads only values computed from the padded input,
    so the chain is exactly the composed conv (kernel, stride, padding and bias), which the bound
    compiler folds it into. (Each conv padding its own input would put zeros between them.)"""
    first = next((i for i, m in enumerate(maps) if m.weight.shape[-1] > 1 or m.stride > 1), 0)
    return [_Affine(m.weight, m.bias, m.stride, padding if i == first else 0) for i, m in enumerate(maps)]


def _bottleneck(gm: fx.GraphModule, block: _Block, branch: list[fx.Node], composed: _Affine,
                single: list[nn.Module], form: str, shortcut: _Affine | None = None) -> LinearBottleneck | None:
    """The branch as its own convs (exactly the composed conv) plus the shortcut, when asked or when
    that costs fewer multiply-adds per example than the ``single`` conv it replaces (both counted
    with the kernel taps that read the input only, as :mod:`.trim_kernels` leaves them). A
    bottleneck 1x1-3x3-1x1 always; two 3x3 convs on large maps (18 c^2 against 25 c^2 taps), not
    on maps of a few pixels, where the first conv's padded output costs more than it saves."""
    if form == "composed":
        return None
    in_shape, out_shape = block.source.meta["shape"], block.add.meta["shape"]
    maps = _factored(gm, branch, in_shape[1])
    if maps is None or len(maps) < 2:
        return None
    maps = _padding_first(maps, composed.padding)
    convs = [_conv_module(m.weight, m.bias, m.stride, m.padding) for m in maps]
    extra = (None if shortcut is None else
             _conv_module(shortcut.weight, shortcut.bias, shortcut.stride, shortcut.padding))
    size = tuple(in_shape[-2:])
    cost = forward_cost(convs, size) + (forward_cost([extra], size) if extra is not None else 0)
    if form == "auto" and cost >= forward_cost(single, size):
        return None
    module = LinearBottleneck(convs, extra)
    with torch.no_grad():
        try:
            fits = tuple(module(torch.zeros(1, *in_shape[1:])).shape) == (1, *out_shape[1:])
        except RuntimeError:  # branch and shortcut disagree on the output size
            fits = False
    return module if fits else None


def _conv_replacement(gm: fx.GraphModule, block: _Block, num_blocks: int, bottleneck: str = "auto"
                      ) -> tuple[list[nn.Module], str] | None:
    in_shape, out_shape = block.source.meta["shape"], block.add.meta["shape"]
    branch = [n for n in reversed(block.branch) if not is_activation(gm, n)]
    main = _compose(gm, branch, in_shape[1])
    short = _compose(gm, list(reversed(block.shortcut)), in_shape[1])
    if main is None or short is None:
        return None
    k = main.weight.shape[-1]
    out_hw = (in_shape[-1] + 2 * main.padding - k) // main.stride + 1
    if main.weight.shape[0] != out_shape[1] or out_hw != out_shape[-1]:
        return None
    identity = not block.shortcut
    if identity and main.stride == 1 and k % 2 == 1 and main.padding == k // 2 and in_shape[1] == out_shape[1]:
        single = [_conv_module(main.weight, main.bias, 1, main.padding)]
        factored = _bottleneck(gm, block, branch, main, single, bottleneck)
        if factored is not None:
            return [factored], f"LinearBottleneck({factored.extra_repr()})"
        lires = LiResNetBlock(in_shape[1], num_blocks, kernel_size=k)
        with torch.no_grad():
            lires.conv.weight.copy_(main.weight)
            lires.conv.bias.copy_(main.bias)
            lires.beta.fill_(math.sqrt(num_blocks))  # beta / sqrt(L) = 1: the composed branch as is
        return [lires], f"LiResNetBlock({in_shape[1]}, k={k})"
    # a transition: shortcut + branch as one strided conv
    chw = tuple(in_shape[1:])
    ops = [ConvOp(chw, t.weight, (t.stride, t.stride), (t.padding,) * 4) for t in (main, short)]
    merged = add_operators(*ops)
    if not isinstance(merged, ConvOp) or tuple(merged.out_shape) != tuple(out_shape[1:]):
        return None
    constant = (main.bias + short.bias).view(1, -1, 1, 1).expand(1, *out_shape[1:])
    modules = module_for(merged, constant)
    if modules is None:
        return None
    factored = _bottleneck(gm, block, branch, main, modules, bottleneck, short)
    if factored is not None:
        return [factored], f"LinearBottleneck({factored.extra_repr()}, projection shortcut)"
    conv = modules[-1]
    return modules, f"transition Conv2d {conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x" \
                    f"{conv.kernel_size[1]} s{conv.stride[0]}"


def _linearize(gm: fx.GraphModule, block: _Block, num_lires: int, activation: str, bottleneck: str) -> None:
    add = block.add
    spatial = len(add.meta["shape"]) == 4
    replacement = _conv_replacement(gm, block, num_lires, bottleneck) if spatial else None
    if replacement is not None:
        modules, after = replacement
        current = block.source
        shape = block.source.meta["shape"]
        with gm.graph.inserting_before(add), torch.no_grad():
            for module in modules:
                current = gm.graph.call_module(add_submodule(gm, add.name + ".block", module), (current,))
                # the next block reads its source's shape: known here without another forward
                shape = (shape[0], *module(torch.zeros(1, *shape[1:])).shape[1:])
                current.meta.update(shape=shape, dynamic=True)
        add.replace_all_uses_with(current)
        output = replacement_module = current
    else:
        # keep the layers, drop the activations: the branch becomes linear
        for node in block.branch:
            if is_activation(gm, node):
                node.replace_all_uses_with(tensor_args(node)[0])
                gm.graph.erase_node(node)
        output, after, replacement_module = add, "x + linear branch", None
    users = list(output.users)
    if not (len(users) == 1 and is_activation(gm, users[0])):
        act = sorting_activation(add.meta["shape"], activation)
        if act is not None:
            with gm.graph.inserting_after(output):
                new = gm.graph.call_module(add_submodule(gm, add.name + ".act", act), (output,))
            new.meta.update(shape=add.meta["shape"], dynamic=True)
            output.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            after += f" -> {type(act).__name__}"
    log_rewrite(gm, "linearize_residual_branches", add.name,
                f"x + branch({len(block.branch)} nodes) with {len(block.shortcut) or 'identity'} shortcut",
                after, True, replacement_module.target if replacement_module is not None else "")


@conversion_pass(changes_function=True, parameters={"activation": ACTIVATION, "bottleneck": BOTTLENECK},
                 after=("fold_batchnorm", "replace_gates", "attention_to_spatial_mlp"))
def linearize_residual_branches(gm: fx.GraphModule, input_shape: tuple[int, ...], activation: str = "minmax",
                                bottleneck: str = "auto") -> fx.GraphModule:
    """Linearize every residual block ``x + g(x)`` whose branch ``g`` is nonlinear and shortcut linear."""
    if bottleneck not in BOTTLENECK_FORMS:
        raise ValueError(f"bottleneck must be one of {', '.join(BOTTLENECK_FORMS)}, got {bottleneck!r}")
    drop_passthrough(gm)
    blocks = _find_blocks(gm)
    num_lires = sum(1 for b in blocks if not b.shortcut and len(b.add.meta["shape"]) == 4) or 1
    done: set[str] = set()
    while True:
        # one block at a time: each rewrite changes the nodes the next block starts from
        block = next((b for b in _find_blocks(gm) if b.add.name not in done), None)
        if block is None:
            break
        done.add(block.add.name)
        _linearize(gm, block, num_lires, activation, bottleneck)  # gives its new nodes their shapes
        finalize(gm)
    return gm
