"""Pass: ``x + conv(x)`` and any sum of linear branches of one node become one layer (exact).

The LiResNet observation: a residual whose branch is linear is a single convolution with kernel
``W + Delta``, so its Lipschitz constant is that conv's norm, not ``1 + ||W||``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import (describe_module, drop_passthrough, fold_region, is_linear_unit,
                    replace_with_modules, single_input, tensor_args)
from .log import log_rewrite
from .passes import conversion_pass

__all__ = ["fold_linear_residuals", "is_add"]


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def linear_chain(gm: fx.GraphModule, start: fx.Node) -> list[fx.Node]:
    """``start`` and its single-input, single-user linear ancestors, nearest first."""
    chain, node = [], start
    while is_linear_unit(gm, node) and (node is start or len(node.users) == 1):
        chain.append(node)
        nxt = single_input(node)
        if nxt is None:
            break
        node = nxt
    return chain


@conversion_pass(changes_function=False)
def fold_linear_residuals(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    drop_passthrough(gm)
    for node in list(gm.graph.nodes):
        if not is_add(node) or node.graph is not gm.graph:
            continue
        args = tensor_args(node)
        if len(args) != 2:
            continue
        chains = [linear_chain(gm, a) if len(a.users) == 1 else [] for a in args]
        # each side: its chain's nodes, and where the chain starts (its source)
        ends = [single_input(c[-1]) if c else a for c, a in zip(chains, args)]
        if ends[0] is None or ends[0] is not ends[1]:
            continue
        source = ends[0]
        region = [n for c in chains for n in c] + [node]
        modules = fold_region(gm, source, node, region, tuple(source.meta["shape"][1:]))
        if modules is None or len(modules) > 2:
            continue
        before = " + ".join([" -> ".join(reversed([str(n.name) for n in c])) or source.name for c in chains])
        new = replace_with_modules(gm, source, node, modules, node.name)
        new.meta["dynamic"] = True
        log_rewrite(gm, "fold_linear_residuals", node.name, before, " + ".join(describe_module(m) for m in modules),
                    False, new.target)
    return gm
