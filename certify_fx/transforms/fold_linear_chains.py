"""Pass: fold consecutive linear layers with nothing nonlinear between them into one (exact).

conv∘conv folds when one of them is pointwise (1x1), linear∘linear always, per-channel scalings
into their neighbour; two 3x3 convs stay apart (zero padding between them makes the composition
differ from any single conv at the borders).
"""

from __future__ import annotations

import torch.fx as fx

from .graph import (annotate_shapes, describe, describe_module, drop_passthrough, finalize, fold_region,
                    is_linear_unit, replace_with_modules, single_input)
from .log import log_rewrite
from .passes import conversion_pass

__all__ = ["fold_linear_chains"]


@conversion_pass(changes_function=False)
def fold_linear_chains(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Fold pairs of single-input linear nodes until nothing more folds exactly."""
    drop_passthrough(gm)
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or not is_linear_unit(gm, node):
                continue
            prev = single_input(node)
            if prev is None or not is_linear_unit(gm, prev) or len(prev.users) != 1:
                continue
            source = single_input(prev)
            if source is None:
                continue
            modules = fold_region(gm, source, node, [prev, node], tuple(source.meta["shape"][1:]))
            if modules is None or len(modules) >= 2:
                continue
            before = f"{describe(gm, prev)} -> {describe(gm, node)}"
            new = replace_with_modules(gm, source, node, modules, node.name)
            new.meta["dynamic"] = True
            log_rewrite(gm, "fold_linear_chains", node.name, before, describe_module(modules[0]), False)
            finalize(gm)
            annotate_shapes(gm, input_shape)
            changed = True
            break
    return gm
