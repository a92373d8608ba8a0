"""Operations that are refused with a reason and a fix, rather than the generic "no rule".

Normalisation by the input's own statistics, dot-product attention, recurrent layers, and
random operations (a certificate is a statement about one fixed function) are refused wherever
they appear; any other operation without a rule is refused by the compiler itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import timm_layers
from ...errors import NotLipschitzError
from ..registry import register_module_rule, register_rule
from .common import FIX_ATTENTION, FIX_NORMALIZATION

NORMALIZATION_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm,
                         nn.RMSNorm, *timm_layers.NORMALIZATION)

#: operations whose result is random: the model would not be one function.
RANDOM_FUNCTIONS = frozenset({
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like, torch.randperm,
    torch.normal, torch.bernoulli, torch.multinomial, torch.poisson, F.alpha_dropout, F.feature_alpha_dropout,
    F.rrelu,
})
RANDOM_METHODS = frozenset({"uniform_", "normal_", "bernoulli", "bernoulli_", "random_", "exponential_", "cauchy_",
                            "log_normal_", "geometric_", "multinomial"})
RANDOM_MODULES = (nn.RReLU, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _not_lipschitz(ev, reason: str, fix: str):
    ev.fail(reason, fix, NotLipschitzError)


@register_module_rule(*NORMALIZATION_MODULES, kind="normalization")
def normalization_module(ev, module, input):
    _not_lipschitz(ev, "normalisation by the input's own statistics is not globally Lipschitz", FIX_NORMALIZATION)


@register_rule(F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.rms_norm, kind="normalization")
def normalization(ev, input, *args, eps=1e-5, weight=None, bias=None):
    _not_lipschitz(ev, "normalisation by the input's own statistics is not globally Lipschitz", FIX_NORMALIZATION)


@register_rule(F.normalize)
def normalize(ev, input, p=2.0, dim=1, eps=1e-12, out=None):
    _not_lipschitz(ev, "dividing by the input's own norm is not globally Lipschitz", FIX_NORMALIZATION)


@register_module_rule(nn.MultiheadAttention, inputs=("query", "key", "value"))
def attention_module(ev, module, query, key, value, *args, key_padding_mask=None, need_weights=True,
                     attn_mask=None, average_attn_weights=True, is_causal=False):
    _not_lipschitz(ev, "dot-product attention is not globally Lipschitz", FIX_ATTENTION)


@register_rule(F.scaled_dot_product_attention, torch.einsum, torch.bmm, "bmm", inputs=("args",))
def attention(ev, *args, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    _not_lipschitz(ev, "products of input-dependent tensors (attention, einsum, bmm) are not globally Lipschitz",
                   FIX_ATTENTION)


@register_module_rule(nn.LSTM, nn.GRU, nn.RNN, nn.Transformer, nn.TransformerEncoderLayer,
                      nn.TransformerDecoderLayer, nn.TransformerEncoder, inputs=("args",))
def recurrent_module(ev, module, *args):
    _not_lipschitz(ev, f"{type(module).__name__} contains gates or attention (products of input-dependent "
                       "tensors), which are not globally Lipschitz",
                   "replace it with Lipschitz layers (convolutions, dense layers, MinMax)")
