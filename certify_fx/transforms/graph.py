"""Graph helpers shared by the passes: shapes, node kinds, submodule insertion, linear regions."""

from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..bounds import registry
from ..bounds.analysis import example_shapes
from ..bounds.capture import example_input
from ..bounds.compiler import linear_form
from ..bounds.operators import Conv2d, Dense, LinearOperator, Scale
from ..bounds.values import Tracked
from ..nn import Affine

__all__ = [
    "annotate_shapes",
    "capture_values",
    "swap_for_module",
    "describe",
    "describe_module",
    "drop_passthrough",
    "add_submodule",
    "tensor_args",
    "extract",
    "fold_region",
    "module_for",
    "is_activation",
    "is_passthrough",
]

def annotate_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    """Store each node's output shape (batch 2) in ``node.meta['shape']`` and whether it depends
    on the input in ``node.meta['dynamic']`` (one example forward)."""
    shapes = example_shapes(gm, input_shape)
    first = True
    for node in gm.graph.nodes:
        node.meta["shape"] = shapes.get(node.name)
        if node.op == "placeholder":
            node.meta["dynamic"], first = first, False
        else:
            node.meta["dynamic"] = any(a.meta.get("dynamic", False) for a in node.all_input_nodes)


def describe_module(module: nn.Module) -> str:
    """A short description: the type and, for convs and dense layers, their shape."""
    name = type(module).__name__
    if isinstance(module, nn.Conv2d):
        k, s = module.kernel_size, module.stride
        stride = f" s{s[0]}" if s != (1, 1) else ""
        return f"{name} {module.in_channels}->{module.out_channels} {k[0]}x{k[1]}{stride}"
    if isinstance(module, nn.Linear):
        return f"{name} {module.in_features}->{module.out_features}"
    return name


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return describe_module(gm.get_submodule(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def drop_passthrough(gm: fx.GraphModule) -> None:
    """Remove identity and eval-mode dropout nodes (exact; not logged)."""
    for node in list(gm.graph.nodes):
        if is_passthrough(gm, node) and node.args and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def add_submodule(gm: fx.GraphModule, hint: str, module: nn.Module) -> str:
    """Register ``module`` under a fresh name derived from ``hint``; returns the qualified name."""
    base = "cfx_" + hint.replace(".", "_")
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.add_module(name, module)
    return name


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Arguments of ``node`` that are input-dependent tensors (needs :func:`annotate_shapes`)."""
    return [a for a in node.all_input_nodes if a.meta.get("dynamic") and a.meta.get("shape") is not None]


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an activation: its rule was registered with ``kind="activation"``."""
    return registry.node_kind(node, gm) == "activation"


def is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Identity, or dropout in eval mode (both compute the identity)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Identity):
            return True
        if isinstance(m, (nn.Dropout, nn.Dropout2d)) or type(m).__name__ == "DropPath":
            return not m.training or getattr(m, "p", getattr(m, "drop_prob", 0.0)) == 0
    if node.op == "call_function" and node.target in (F.dropout,):
        return node.kwargs.get("training", True) is False
    return False


def extract(gm: fx.GraphModule, source: fx.Node, output: fx.Node, region: Iterable[fx.Node]) -> fx.GraphModule:
    """A GraphModule computing ``output`` from ``source`` through ``region`` (constants copied)."""
    region = set(region)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("x")}

    def copy(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        for arg in node.all_input_nodes:
            copy(arg)
        if node not in region and node.meta.get("dynamic"):
            raise ValueError(f"node {node.name} is outside the region but depends on the input")
        env[node] = graph.node_copy(node, lambda n: env[n])
        return env[node]

    graph.output(copy(output))
    return fx.GraphModule(gm, graph)


def module_for(op: LinearOperator, constant: torch.Tensor) -> list[nn.Module] | None:
    """Modules computing ``op(x) + constant`` exactly, or None when the constant is not a bias.

    ``constant`` is the region's output at zero input (batch 1); a conv's bias must be spatially
    uniform for the fold to be exact.
    """
    with torch.no_grad():
        if isinstance(op, Conv2d):
            const = constant[0]
            bias = const[:, :1, :1]
            if not torch.allclose(const, bias.expand_as(const), atol=1e-6, rtol=1e-5):
                return None
            o, c_g, kh, kw = op.weight.shape
            t, b, l, r = op.padding
            conv = nn.Conv2d(c_g * op.groups, o, (kh, kw), op.stride, 0, op.dilation, op.groups)
            conv.weight.copy_(op.weight)
            conv.bias.copy_(bias.flatten())
            if t == b and l == r and t >= 0 and l >= 0:
                conv.padding = (t, l)
                return [conv]
            return [nn.ZeroPad2d((l, r, t, b)), conv]
        if isinstance(op, Dense):
            rows = constant.reshape(-1, op.weight.shape[0])
            if not torch.allclose(rows, rows[:1].expand_as(rows), atol=1e-6, rtol=1e-5):
                return None
            linear = nn.Linear(op.weight.shape[1], op.weight.shape[0])
            linear.weight.copy_(op.weight)
            linear.bias.copy_(rows[0])
            return [linear]
        if isinstance(op, Scale) and len(op.in_shape) >= 1 and (vec := op.along(0)) is not None:
            const = constant[0]
            bias = const.reshape(const.shape[0], -1)[:, :1]
            if not torch.allclose(const.reshape(const.shape[0], -1), bias.expand(-1, const[0].numel()), atol=1e-6):
                return None
            affine = Affine(op.in_shape[0], dim=1)
            affine.weight.copy_(vec)
            affine.bias.copy_(bias.flatten())
            return [affine]
    return None


def fold_region(gm: fx.GraphModule, source: fx.Node, output: fx.Node, region: Iterable[fx.Node],
                input_shape: tuple[int, ...]) -> list[nn.Module] | None:
    """Fold an affine region from ``source`` to ``output`` into modules, or None if not exact."""
    try:
        sub = extract(gm, source, output, region)
        form = linear_form(sub, input_shape)
    except Exception:  # a region the compiler cannot express is simply not folded
        return None
    if not isinstance(form, Tracked) or list(form.form) != ["x"]:
        return None
    with torch.no_grad():
        zero = torch.zeros(1, *input_shape, dtype=next(gm.parameters()).dtype)
        constant = sub(zero)
    return module_for(form.form["x"], constant)


def replace_with_modules(gm: fx.GraphModule, source: fx.Node, output: fx.Node, modules: list[nn.Module],
                         hint: str) -> fx.Node:
    """Insert ``modules`` as a chain from ``source`` and make it replace ``output``."""
    current = source
    with gm.graph.inserting_before(output):
        for module in modules:
            name = add_submodule(gm, hint, module)
            current = gm.graph.call_module(name, (current,))
    output.replace_all_uses_with(current)
    current.meta["shape"] = output.meta.get("shape")
    return current


class _Capture(fx.Interpreter):
    """Runs the graph and keeps the values of the nodes asked for."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n in self.keep:
            self.values[n] = result.detach()
        return result


@torch.no_grad()
def capture_values(gm: fx.GraphModule, nodes: set[fx.Node], input_shape: tuple[int, ...], batch: int = 8
                   ) -> dict[fx.Node, torch.Tensor]:
    """The values ``nodes`` take on a deterministic example batch (passes that initialise new
    layers from what the old ones computed)."""
    capture = _Capture(gm, set(nodes))
    capture.run(example_input(tuple(input_shape), batch=batch))
    return capture.values


def swap_for_module(gm: fx.GraphModule, node: fx.Node, hint: str, module: nn.Module, args: tuple) -> fx.Node:
    """Replace ``node`` by a call of the new submodule ``module`` on ``args``; returns the call."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(add_submodule(gm, hint, module), args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove dead nodes and unused submodules, check the graph, regenerate code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


OPERATORS_ADD = (operator.add, operator.iadd, torch.add)


def is_linear_unit(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A single-input affine operation the folding passes may absorb."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # a normalisation that is affine in eval mode
            return not m.training and m.running_var is not None
        return registry.node_kind(node, gm) == "linear" or is_passthrough(gm, node)
    if node.op == "call_function" and node.target in (operator.mul, operator.truediv, torch.mul):
        return len(tensor_args(node)) == 1 and len(node.all_input_nodes) <= 2
    return False


def single_input(node: fx.Node) -> fx.Node | None:
    args = tensor_args(node)
    return args[0] if len(args) == 1 else None
