"""Pass: BatchNorm / LayerNorm / GroupNorm become learnable per-channel Affine layers.

Normalising by the input's own (or the batch's) statistics is not globally Lipschitz. The Affine
keeps the layer's learned scale and shift: for BatchNorm it is initialised to the eval-mode map
(exact in eval mode); for LayerNorm/GroupNorm the statistics are dropped (the function changes).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import timm_layers
from ..bounds.registry import node_kind
from ..nn import Affine
from .graph import add_submodule, describe, tensor_args
from .log import log_rewrite
from .passes import conversion_pass

__all__ = ["remove_normalization"]


def _affine(num: int, dim: int, weight, bias) -> Affine:
    affine = Affine(num, dim=dim)
    with torch.no_grad():
        if weight is not None:
            affine.weight.copy_(weight.detach().reshape(-1))
        if bias is not None:
            affine.bias.copy_(bias.detach().reshape(-1))
    return affine


def _replacement(gm: fx.GraphModule, node: fx.Node) -> tuple[Affine, bool] | None:
    """The Affine for a normalisation node and whether it changes the function (None: no such form)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_var is None:
                return _affine(m.num_features, 1, m.weight, m.bias), True
            scale = torch.rsqrt(m.running_var + m.eps) * (m.weight if m.weight is not None else 1)
            shift = (m.bias if m.bias is not None else 0) - m.running_mean * scale
            return _affine(m.num_features, 1, scale, shift), m.training
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            # by exact type: which dim a LayerNorm subclass normalises is its forward's to say
            dims = {**{cls: -1 for cls in timm_layers.CHANNELS_LAST_LAYER_NORMS},
                    **{cls: 1 for cls in timm_layers.CHANNELS_FIRST_LAYER_NORMS}}
            dim = dims.get(type(m))
            return None if dim is None else (_affine(m.normalized_shape[0], dim, m.weight, m.bias), True)
        if isinstance(m, nn.GroupNorm):
            return _affine(m.num_channels, 1, m.weight, m.bias), True
        return None
    if node.op == "call_function" and node.target is F.layer_norm:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        if len(shape) != 1:
            return None
        return _affine(shape[0], -1, _constant(gm, weight), _constant(gm, bias)), True
    return None


def _constant(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    return gm.get_parameter(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


@conversion_pass(changes_function=True, after=("fold_batchnorm",))
def remove_normalization(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        args = tensor_args(node)
        if len(args) != 1 or node_kind(node, gm) != "normalization":
            continue
        found = _replacement(gm, node)  # None for a normalisation with no per-channel Affine form (it stays refused)
        if found is None:
            continue
        affine, changes = found
        before = describe(gm, node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(add_submodule(gm, node.name + ".affine", affine), (args[0],))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        log_rewrite(gm, "remove_normalization", node.name, before, f"Affine({affine.num_features}, dim={affine.dim})",
                    changes)
    return gm
