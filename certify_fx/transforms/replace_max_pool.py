"""Pass: overlapping max-pooling, kept (bounded by sqrt of its overlap) or replaced by a strided conv.

A 3x3 stride-2 max-pool multiplies the bound by 2 (each input sits in up to 4 windows); a
learnable depthwise strided conv of the same geometry, initialised to average pooling, is linear
and folds into its neighbours.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..bounds.constants import max_pool_constant
from .graph import swap_for_module
from .log import log_rewrite
from .passes import Option, conversion_pass

__all__ = ["replace_max_pool", "MAX_POOL_MODES"]


#: what the pass can do with an overlapping max-pool (the CLI's ``--max-pool`` choices)
MAX_POOL_MODES = ("keep", "conv")
MAX_POOL = Option("max_pool", "keep", MAX_POOL_MODES,
                  "overlapping max-pools: keep (bounded by sqrt of the overlap) or replace by a strided conv")


@conversion_pass(changes_function=True, parameters={"mode": MAX_POOL})
def replace_max_pool(gm: fx.GraphModule, input_shape: tuple[int, ...], mode: str = "keep") -> fx.GraphModule:
    """``mode="keep"`` leaves max-pools in place (and logs their factor); ``"conv"`` replaces them."""
    if mode not in MAX_POOL_MODES:
        raise ValueError(f"replace_max_pool: mode must be one of {MAX_POOL_MODES}, got {mode!r}")
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.MaxPool2d):
            continue
        pool = gm.get_submodule(node.target)
        in_shape, out_shape = node.args[0].meta["shape"], node.meta["shape"]
        factor = max_pool_constant(in_shape[-2:], out_shape[-2:], pool.kernel_size, pool.stride, pool.padding,
                                   pool.dilation)
        if mode == "keep" or factor == 1.0 or pool.ceil_mode or pool.dilation not in (1, (1, 1)):
            log_rewrite(gm, "replace_max_pool", node.name, "MaxPool2d", f"kept (Lipschitz factor {factor:.3g})", False)
            continue
        channels = in_shape[1]
        k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        conv = nn.Conv2d(channels, channels, pool.kernel_size, pool.stride, pool.padding, groups=channels, bias=False)
        with torch.no_grad():
            conv.weight.fill_(1.0 / (k * k))
        swap_for_module(gm, node, node.name + ".conv", conv, node.args)
        log_rewrite(gm, "replace_max_pool", node.name, f"MaxPool2d (factor {factor:.3g})",
                    f"depthwise Conv2d {k}x{k} (average-pool init)", True)
    return gm
