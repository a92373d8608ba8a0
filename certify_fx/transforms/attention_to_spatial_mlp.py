"""Pass: self-attention becomes spatial-MLP token mixing (ResMLP-style). Changes the function.

Dot-product attention multiplies two functions of the input (``q @ k^T``) and is not globally
Lipschitz. Each attention module (any module with ``qkv`` and ``proj`` linear layers, as in timm's
ViT/DeiT) is replaced by a learned tokens x tokens matrix ``T`` shared over channels, initialised to
the attention map the module computes on average (over heads and an example batch); an identity
would leave the class token blind to the patches, and a ViT head that reads the class token would
then ignore the image. Two forms (option ``spatial_mlp``):

* ``"pure"`` (default), the spatial MLP of the LiResNet paper's Lipschitz ViT: ``x + T x`` on the
  residual stream (the normalisation, value and output projections in front are dropped). The
  residual is ``(I + T)`` over tokens, the identity over channels: the compiler bounds it exactly
  as ``||I + T||``, and with the folded feed-forward residual ``I + W`` after it the whole block
  as ``||I + T|| ||I + W||``, the exact norm of their Kronecker product.
* ``"projected"``: ``proj(T(value(x)))``, keeping the value and output projections' trained
  weights; its residual ``I + T (x) P V`` is bounded ``1 + ||T|| ||P V||``, loose enough that the
  converted ViT did not certify.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from einops import rearrange
from torch import nn

from ..nn import Affine, TokenMixing
from .graph import add_submodule, capture_values, single_input
from .log import log_rewrite
from .passes import Option, conversion_pass

__all__ = ["SPATIAL_MLP", "attention_to_spatial_mlp"]


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


SPATIAL_MLP_FORMS = ("pure", "projected")
SPATIAL_MLP = Option("spatial_mlp", "pure", SPATIAL_MLP_FORMS,
                     "attention becomes pure token mixing x -> T x (its residual x + T x bounded exactly as ||I + T||) "
                     "or keeps its value and output projections, proj(T(value(x))) (bounded 1 + ||T|| ||proj value||)")


def _residual_stream(gm: fx.GraphModule, x: fx.Node, attention: set[fx.Node]) -> fx.Node:
    """What the normalisation in front of an attention block reads (the residual stream), when the
    attention's nodes are that normalisation's only readers; else ``x`` itself."""
    if x.op == "call_module" and isinstance(gm.get_submodule(x.target), Affine) and set(x.users) <= attention:
        source = single_input(x)
        if source is not None:
            return source
    return x


@conversion_pass(changes_function=True, parameters={"form": SPATIAL_MLP}, after=("remove_normalization",))
def attention_to_spatial_mlp(gm: fx.GraphModule, input_shape: tuple[int, ...], form: str = "pure") -> fx.GraphModule:
    """Replace every attention module by token mixing in the chosen ``form`` (see the module docstring)."""
    if form not in SPATIAL_MLP_FORMS:
        raise ValueError(f"spatial_mlp must be one of {', '.join(SPATIAL_MLP_FORMS)}, got {form!r}")
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
        found.append((path, module, inputs[0], outputs[0], inside))
    if not found:
        return gm
    values = capture_values(gm, {x for _, _, x, _, _ in found}, input_shape)
    for path, module, x, out, inside in found:
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
        if form == "pure":
            chain, current = [("mix", mix)], _residual_stream(gm, x, inside)
            after = f"TokenMixing({tokens}, mean attention map) of the residual stream"
        else:
            chain, current = [("value", value), ("mix", mix), ("proj", copy.deepcopy(module.proj))], x
            after = f"Linear(value) -> TokenMixing({tokens}, mean attention map) -> Linear(proj)"
        with gm.graph.inserting_before(out):
            for suffix, layer in chain:
                current = gm.graph.call_module(add_submodule(gm, f"{path}.{suffix}", layer), (current,))
        out.replace_all_uses_with(current)
        log_rewrite(gm, "attention_to_spatial_mlp", path, f"{type(module).__name__} (softmax attention)", after, True)
    return gm

