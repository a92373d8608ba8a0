"""Pass: rescale every linear layer to operator norm 1, so a converted model starts trainable.

A converted model's bound is the product of its layers' norms. Converted from random weights (no
zero-initialised last BatchNorm, as in ResNetV2 or DenseNet) or from a model trained without any
Lipschitz control, that product reaches 1e16 and more: GloRo's bottom logit is then meaningless and
training diverges. This pass divides each linear layer (conv, dense, Affine, token mixing) whose
estimated norm ``c`` exceeds 1 by ``c``, and every bias and constant (class token, position
embedding) met on the way by the product of the factors before it.

For a positively homogeneous network (linear layers, MinMax/ReLU, max/average pooling, reshapes,
sums of branches rescaled alike) the result is the original function divided by one positive
constant per logit vector: predictions and certified radii are unchanged, only the scale goes. Where
branches meet with different factors (a nonlinear residual, a concatenation of features from
different depths), the function changes; each such node is logged.

A LiResNet block ``x + conv(x)`` keeps its weights (its identity cannot be divided; its norm
stays near 1 by construction) and only its bias is rescaled.

Layers whose weight is exactly zero (timm zero-initialises some heads) would make the logits
constant; they are re-initialised (truncated normal) and logged as a function change.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch import nn

from .. import timm_layers
from ..bounds.dependence import Dependence, input_dependence
from ..bounds.registry import node_kind
from ..bounds.power_iteration import power_iteration
from ..nn import GroupSort, LinearBottleneck, LiResNetBlock, MinMax
from .log import log_rewrite
from .passes import Option, conversion_pass

__all__ = ["rescale_layers", "estimate_linear_norm"]

_PASS = "rescale_layers"
RESCALE = Option("rescale", True, None, "divide each linear layer by its estimated norm where above 1, so the "
                 "model starts with a sane bound", structural=False)
# One dynamic input, output scaled by the same factor as the input (degree-1 homogeneous).
_HOMOGENEOUS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "mean", "sum",
                        "squeeze", "unsqueeze", "expand", "expand_as", "to", "type_as", "__getitem__", "chunk",
                        "split", "amax", "max", "relu", "flip", "roll", "repeat", "clone"}
_HOMOGENEOUS_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.mean, torch.sum,
                          torch.squeeze, torch.unsqueeze, operator.getitem, torch.relu, torch.amax,
                          nn.functional.relu, nn.functional.adaptive_avg_pool2d, nn.functional.avg_pool2d,
                          nn.functional.max_pool2d, nn.functional.adaptive_max_pool2d, torch.flip, torch.roll}
_JOINS = {operator.add, operator.sub, torch.add, torch.sub, torch.cat, torch.concat, torch.stack, "add", "sub"}
_SCALARS = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div", operator.neg, "neg"}


_HOMOGENEOUS_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d, nn.ZeroPad2d, MinMax, GroupSort)


def _homogeneous_module(module: nn.Module) -> bool:
    if isinstance(module, _HOMOGENEOUS_MODULES):
        return True
    if isinstance(module, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        return module.value == 0
    return isinstance(module, timm_layers.SCALE_FREE)


def estimate_linear_norm(module: nn.Module, input_shape: tuple[int, ...], steps: int = 25) -> float:
    """Power-iteration estimate of the norm of ``x -> module(x) - module(0)`` on one input of
    ``input_shape`` (a lower estimate: good for initialisation, never used as a certificate)."""
    param = next(module.parameters())
    start = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0), dtype=param.dtype)
    start = start.to(param.device)
    base = module(torch.zeros_like(start))

    def apply(v: torch.Tensor) -> torch.Tensor:
        return module(v) - base

    def adjoint(u: torch.Tensor) -> torch.Tensor:  # the map is linear: its vjp at any point
        with torch.enable_grad():
            v = torch.zeros_like(start, requires_grad=True)
            (grad,) = torch.autograd.grad(apply(v), v, u)
        return grad

    sigma, _ = power_iteration(apply, adjoint, start, steps=steps, tol=None)
    return float(sigma)


def _scale_parameters(module: nn.Module, weight_factor: float, bias_factor: float) -> None:
    with torch.no_grad():
        module.weight.div_(weight_factor)
        if getattr(module, "bias", None) is not None:
            module.bias.div_(bias_factor)


def _constant_parameter(gm: fx.GraphModule, node: fx.Node, dependence: dict) -> tuple[str, torch.Tensor] | None:
    """The parameter a constant operand is built from (through expand/reshape/...), if any."""
    while node.op in ("call_method", "call_function") and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op != "get_attr" or dependence.get(node) == Dependence.INPUT:
        return None
    try:
        return node.target, gm.get_parameter(node.target)
    except AttributeError:
        try:
            return node.target, gm.get_buffer(node.target)
        except AttributeError:
            return None


@conversion_pass(changes_function=True, enabled_by=RESCALE,
                 after=("fold_linear_chains", "fold_linear_residuals", "linearize_residual_branches",
                        "remove_normalization", "replace_max_pool", "attention_to_spatial_mlp"))
@torch.no_grad()
def rescale_layers(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    dependence = input_dependence(gm)
    scale: dict[fx.Node, float] = {}
    scaled_constants: dict[str, float] = {}
    changed: dict[str, list[float]] = {}

    def of(arg) -> float | None:
        return scale.get(arg) if isinstance(arg, fx.Node) and dependence.get(arg) == Dependence.INPUT else None

    for node in gm.graph.nodes:
        if dependence.get(node) != Dependence.INPUT or node.op == "output":
            continue
        if node.op == "placeholder":
            scale[node] = 1.0
            continue
        inputs = [of(a) for a in node.all_input_nodes if of(a) is not None]
        s_in = inputs[0] if inputs else 1.0
        target = node.target
        if node.op == "call_module":
            module = gm.get_submodule(target)
            if node_kind(node, gm) == "linear" and isinstance(getattr(module, "weight", None), nn.Parameter) \
                    and len(inputs) == 1:
                if not torch.any(module.weight != 0):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    log_rewrite(gm, _PASS, node.name, f"{type(module).__name__} with zero weight (constant output)",
                                "re-initialised (truncated normal, std 0.02)", True)
                shape = node.all_input_nodes[0].meta["shape"][1:]
                c = estimate_linear_norm(module, tuple(shape))
                c = c if math.isfinite(c) and c > 1.0 else 1.0
                _scale_parameters(module, c, s_in * c)
                scale[node] = s_in * c
                continue
            if isinstance(module, LinearBottleneck) and module.shortcut is not None and len(inputs) == 1:
                # shortcut(x) + convs(x): divide the shortcut and the branch's last conv by the block's norm
                c = estimate_linear_norm(module, tuple(node.all_input_nodes[0].meta["shape"][1:]))
                c = c if math.isfinite(c) and c > 1.0 else 1.0
                for conv in module.branch[:-1]:
                    if conv.bias is not None:
                        conv.bias.div_(s_in)
                for conv in (module.branch[-1], module.shortcut):
                    _scale_parameters(conv, c, s_in * c)
                scale[node] = s_in * c
                continue
            if isinstance(module, (LiResNetBlock, LinearBottleneck)) and len(inputs) == 1:
                # x + convs(x): the identity cannot be divided; keep the block, rescale its biases alike
                for conv in (module.conv,) if isinstance(module, LiResNetBlock) else module.branch:
                    if conv.bias is not None:
                        conv.bias.div_(s_in)
                scale[node] = s_in
                continue
            if _homogeneous_module(module) and len(inputs) == 1:
                scale[node] = s_in
                continue
        elif node.op in ("call_method", "call_function"):
            key = target
            if key in _HOMOGENEOUS_METHODS or key in _HOMOGENEOUS_FUNCTIONS:
                if len(set(inputs)) <= 1:
                    scale[node] = s_in
                    continue
            if key in _SCALARS and len(inputs) == 1:
                scale[node] = s_in
                continue
            if key in _JOINS:
                operands = node.args[0] if key in (torch.cat, torch.concat, torch.stack) else node.args[:2]
                operands = [a for a in operands if isinstance(a, fx.Node)]
                dyn = [of(a) for a in operands if of(a) is not None]
                top = max(dyn) if dyn else 1.0
                constants = [a for a in operands if of(a) is None]
                ok = all(math.isclose(d, top, rel_tol=1e-6) for d in dyn)
                for const in constants:
                    found = _constant_parameter(gm, const, dependence)
                    if found is None:
                        ok = ok and math.isclose(top, 1.0)
                        continue
                    name, param = found
                    previous = scaled_constants.get(name)
                    if previous is None:
                        param.div_(top)
                        scaled_constants[name] = top
                    ok = ok and math.isclose(scaled_constants[name], top, rel_tol=1e-6)
                if not ok:
                    changed[node.name] = dyn
                scale[node] = top
                continue
        if any(not math.isclose(s, 1.0) for s in inputs):
            changed[node.name] = inputs
        scale[node] = max(inputs, default=1.0)
    for name, factors in changed.items():
        log_rewrite(gm, _PASS, name, f"inputs divided by {', '.join(f'{f:.3g}' for f in factors)}",
                    "function changed: branches rescaled unequally, or a non-homogeneous op", True)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    final = [scale.get(a) for a in output.all_input_nodes if a in scale]
    if final and not math.isclose(max(final), 1.0):
        log_rewrite(gm, _PASS, "output", "linear layers with norms up to their trained values",
                    f"every linear layer of norm <= 1 (estimated); logits divided by {max(final):.3g}"
                    + ("" if changed else ", predictions unchanged"), bool(changed))
    gm.recompile()
    return gm
