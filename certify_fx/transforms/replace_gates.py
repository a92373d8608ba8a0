"""Pass: squeeze-excitation gates become learned per-channel scales. Changes the function.

``x * gate(x)`` with a per-channel gate (shape ``(N, C, 1, 1)``: SE-ResNet, EfficientNet,
MobileNetV3, ...) multiplies two functions of the input and is not globally Lipschitz. The gate is
replaced by an ``Affine`` scale initialised to the gate's mean value per channel on an example
batch, so the block keeps the channel weighting it had on average; the gate's layers are removed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..nn import Affine
from .graph import capture_values, swap_for_module
from .log import log_rewrite
from .passes import conversion_pass

__all__ = ["replace_gates"]

_MULS = {operator.mul, torch.mul, "mul"}


def _is_sigmoid(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return "sigmoid" in type(gm.get_submodule(node.target)).__name__.lower()
    return "sigmoid" in getattr(node.target, "__name__", str(node.target)).lower()


def _gate(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(x, gate)`` when ``node`` multiplies a feature map by a per-channel gate of the input
    (where the map is 1x1 too, the gate is the operand a sigmoid makes)."""
    if node.op not in ("call_function", "call_method") or node.target not in _MULS or len(node.args) != 2:
        return None
    a, b = node.args
    if not all(isinstance(v, fx.Node) and v.meta.get("dynamic") and v.meta.get("shape") for v in (a, b)):
        return None
    for x, gate in ((a, b), (b, a)):
        xs, gs = x.meta["shape"], gate.meta["shape"]
        if len(xs) == len(gs) >= 3 and gs[:2] == xs[:2] and all(d == 1 for d in gs[2:]):
            if any(d > 1 for d in xs[2:]) or (_is_sigmoid(gm, gate) and not _is_sigmoid(gm, x)):
                return x, gate
    return None


@conversion_pass(changes_function=True)
def replace_gates(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    found = [(node, *pair) for node in gm.graph.nodes if (pair := _gate(gm, node)) is not None]
    if not found:
        return gm
    values = capture_values(gm, {gate for _, _, gate in found}, input_shape)
    for node, x, gate in found:
        mean = values[gate].mean(dim=0).flatten()
        scale = Affine(mean.numel(), dim=1, bias=False)
        with torch.no_grad():
            scale.weight.copy_(mean)
        swap_for_module(gm, node, f"{node.name}.scale", scale, (x,))
        log_rewrite(gm, "replace_gates", node.name, f"x * gate(x) (per-channel gate of {mean.numel()} channels)",
                    f"Affine({mean.numel()}) scale = the gate's mean on an example batch", True)
    return gm
