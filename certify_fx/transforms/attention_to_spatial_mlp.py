"""Pass: self-attention becomes spatial-MLP token mixing (ResMLP-style). Changes the function.

Dot-product attention multiplies two functions of the input (``q @ k^T``) and is not globally
Lipschitz. Each attention module (any module with ``qkv`` and ``proj`` linear layers, as in timm's
ViT/DeiT) is replaced by ``proj(TokenMixing(value(x)))``: the value and output projections keep
their trained weights; the attention map becomes a learned tokens x tokens matrix shared over
channels, initialised to the attention map the module computes on average (over heads and an
example batch). An identity initialisation would leave the class token blind to the patches, and a
ViT head that reads the class token would then ignore the image.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from einops import rearrange
from torch import nn

from ..nn import TokenMixing
from .graph import add_submodule, capture_values
from .log import log_rewrite
from .passes import conversion_pass

__all__ = ["attention_to_spatial_mlp"]


def _attention_modules(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module path -> its nodes, for every attention-like module the graph was traced through."""
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, (_, cls) in (node.meta.get("nn_module_stack") or {}).items():
            if isinstance(cls, type) and _looks_like_attention(cls):
                groups.setdefault(path, []).append(node)
                break
    return groups


def _looks_like_attention(cls: type) -> bool:
    return "Attention" in cls.__name__ and cls.__name__ not in ("TokenMixing",)


def mean_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The softmax attention map of a timm-style ``Attention`` on ``x`` (batch, tokens, dim),
    averaged over the batch and the heads: a (tokens, tokens) row-stochastic matrix."""
    dim = x.shape[-1]
    heads = int(getattr(module, "num_heads", 1))
    q, k, _ = rearrange(module.qkv(x), "b t (qkv h d) -> qkv b h t d", qkv=3, h=heads)
    q, k = getattr(module, "q_norm", nn.Identity())(q), getattr(module, "k_norm", nn.Identity())(k)
    scale = float(getattr(module, "scale", (dim // heads) ** -0.5))
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1).mean(dim=(0, 1))


@conversion_pass(changes_function=True, after=("remove_normalization",))
def attention_to_spatial_mlp(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    found = []
    for path, nodes in _attention_modules(gm).items():
        try:
            module = gm.get_submodule(path)  # holds the qkv/proj layers the graph calls
        except AttributeError:
            continue
        if not isinstance(getattr(module, "qkv", None), nn.Linear) or not isinstance(
                getattr(module, "proj", None), nn.Linear):
            continue
        inside = set(nodes)
        inputs = [a for n in nodes for a in n.all_input_nodes if a not in inside and a.meta.get("dynamic")]
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(set(inputs)) != 1 or len(outputs) != 1:
            continue
        found.append((path, module, inputs[0], outputs[0]))
    if not found:
        return gm
    values = capture_values(gm, {x for _, _, x, _ in found}, input_shape)
    for path, module, x, out in found:
        tokens, dim = x.meta["shape"][1], x.meta["shape"][2]
        qkv: nn.Linear = module.qkv
        value = nn.Linear(dim, dim, bias=qkv.bias is not None)
        with torch.no_grad():
            value.weight.copy_(qkv.weight[2 * dim:3 * dim])
            if qkv.bias is not None:
                value.bias.copy_(qkv.bias[2 * dim:3 * dim])
        mix = TokenMixing(tokens)
        with torch.no_grad():
            mix.weight.copy_(mean_attention(module, values[x]))
        chain = [("value", value), ("mix", mix), ("proj", copy.deepcopy(module.proj))]
        current = x
        with gm.graph.inserting_before(out):
            for suffix, layer in chain:
                current = gm.graph.call_module(add_submodule(gm, f"{path}.{suffix}", layer), (current,))
        out.replace_all_uses_with(current)
        log_rewrite(gm, "attention_to_spatial_mlp", path, f"{type(module).__name__} (softmax attention)",
                    f"Linear(value) -> TokenMixing({tokens}, mean attention map) -> Linear(proj)", True)
    return gm

