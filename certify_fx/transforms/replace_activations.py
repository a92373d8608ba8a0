"""Pass: replace activations (module or functional form) by MinMax or GroupSort. Changes the function.

ReLU, GELU, SiLU, LeakyReLU, Hardswish, ... are 1-Lipschitz at best and shrink gradients;
MinMax/GroupSort are 1-Lipschitz *and* gradient-norm preserving, which GloRo training needs.
Sorting runs over channels for (N, C, ...) tensors and over the feature dim for (N, T, D) tokens.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..nn import GroupSort, MinMax
from .graph import add_submodule, describe, is_activation, tensor_args
from .log import log_rewrite
from .passes import Option, conversion_pass

__all__ = ["replace_activations", "sorting_activation", "ACTIVATIONS"]

#: the activations the pass puts in place (the CLI's ``--activation`` choices): the sorting ones,
#: or ``relu`` (the source's activations are kept and ReLU is what a linearised block gets after it)
ACTIVATIONS = ("minmax", "groupsort", "relu")
ACTIVATION = Option("activation", "minmax", ACTIVATIONS,
                    "the activation put in place of ReLU, GELU, ...: minmax (pairs), groupsort (groups of 4), or relu "
                    "(keep the model's own activations)")


def sorting_activation(shape: tuple[int, ...], to: str = "minmax", group_size: int = 2) -> nn.Module | None:
    """The MinMax/GroupSort (or ReLU) for a tensor of ``shape`` (batch included), or None if it cannot pair."""
    if to == "relu":
        return nn.ReLU()
    dim = -1 if len(shape) == 3 else 1
    size = shape[dim]
    group = 2 if to == "minmax" else group_size
    if size % group:
        return None
    return MinMax(dim=dim) if to == "minmax" else GroupSort(group, dim=dim)


@conversion_pass(changes_function=True, parameters={"to": ACTIVATION}, after=("linearize_residual_branches",))
def replace_activations(gm: fx.GraphModule, input_shape: tuple[int, ...], to: str = "minmax",
                        group_size: int = 4) -> fx.GraphModule:
    """Replace every activation node.

    Args:
        to: ``"minmax"`` (pairs) or ``"groupsort"`` (groups of ``group_size``).
    """
    if to not in ACTIVATIONS:
        raise ValueError(f"replace_activations: to must be one of {ACTIVATIONS}, got {to!r}")
    if to == "relu":
        return gm  # the model's own activations stay, each bounded by its rule
    for node in list(gm.graph.nodes):
        if not is_activation(gm, node):
            continue
        args = tensor_args(node)
        shape = node.meta.get("shape")
        if len(args) != 1 or shape is None:
            continue
        act = sorting_activation(shape, to, group_size)
        before = describe(gm, node)
        if act is None:
            log_rewrite(gm, "replace_activations", node.name, before, f"kept ({shape} does not split into groups)",
                        False)
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(add_submodule(gm, node.name + ".act", act), (args[0],))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        log_rewrite(gm, "replace_activations", node.name, before, f"{type(act).__name__}(dim={act.dim})", True)
    return gm
