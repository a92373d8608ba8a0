"""Pass: fold eval-mode BatchNorm into the preceding conv/linear; a standalone one becomes an Affine.

Exact: the outputs do not change (up to float round-off).
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .graph import (describe, describe_module, drop_passthrough, fold_region,
                    replace_with_modules, single_input)
from .log import log_rewrite
from .passes import conversion_pass

__all__ = ["fold_batchnorm"]


def _is_eval_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    m = gm.get_submodule(node.target)
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.running_var is not None


@conversion_pass(changes_function=False, after=("split_norm_act",))
def fold_batchnorm(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Fold every eval-mode BatchNorm node (train-mode ones are left to ``remove_normalization``)."""
    drop_passthrough(gm)
    for node in list(gm.graph.nodes):
        if not _is_eval_bn(gm, node):
            continue
        prev = single_input(node)
        if prev is None:
            continue
        before = describe(gm, node)
        region, source = [node], prev
        producer = gm.get_submodule(prev.target) if prev.op == "call_module" else None
        if isinstance(producer, (nn.Conv2d, nn.Linear)) and len(prev.users) == 1 and single_input(prev) is not None:
            region, source = [prev, node], single_input(prev)
            before = f"{describe(gm, prev)} + {before}"
        modules = fold_region(gm, source, node, region, tuple(source.meta["shape"][1:]))
        if modules is None:
            continue
        new = replace_with_modules(gm, source, node, modules, node.name)
        log_rewrite(gm, "fold_batchnorm", node.name, before, " + ".join(describe_module(m) for m in modules), False)
        new.meta["dynamic"] = True
    return gm
