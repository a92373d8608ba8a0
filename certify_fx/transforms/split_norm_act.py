"""Pass: split timm's fused norm + activation layers (BatchNormAct2d) into two nodes (exact)."""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from .. import timm_layers
from .graph import add_submodule
from .log import log_rewrite
from .passes import conversion_pass

__all__ = ["split_norm_act"]


@conversion_pass(changes_function=False)
def split_norm_act(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """``BatchNormAct2d(x)`` becomes ``act(BatchNorm2d(x))`` so later passes see both parts."""
    types = timm_layers.NORM_ACT
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), types):
            continue
        fused = gm.get_submodule(node.target)
        norm = nn.BatchNorm2d(fused.num_features, fused.eps, fused.momentum, fused.affine, fused.track_running_stats)
        norm.load_state_dict(fused.state_dict(), strict=False)
        norm.train(fused.training)
        with gm.graph.inserting_before(node):
            current = gm.graph.call_module(add_submodule(gm, f"{node.target}.bn", norm), node.args, node.kwargs)
            for part in (fused.drop, fused.act):
                if not isinstance(part, nn.Identity):
                    current = gm.graph.call_module(add_submodule(gm, f"{node.target}.part", copy.deepcopy(part)),
                                                   (current,))
        node.replace_all_uses_with(current)
        gm.graph.erase_node(node)
        log_rewrite(gm, "split_norm_act", node.name, type(fused).__name__,
                    f"BatchNorm2d -> {type(fused.act).__name__}", False)
    return gm
