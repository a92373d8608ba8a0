"""Normalisation with fixed statistics: eval-mode BatchNorm and per-channel affine maps.

Both are per-channel scalings (plus a constant); normalisation by the input's own statistics
(LayerNorm, GroupNorm, training-mode BatchNorm) is not globally Lipschitz and is refused in
:mod:`.refusals`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import nn as cnn
from ... import timm_layers
from ...errors import NotLipschitzError
from ..operators import Scale
from ..registry import register_module_rule, register_rule
from .common import FIX_EVAL, feature_dim

FIX_TRAIN_BN = ("call model.eval() so it uses running statistics (pass `fold_batchnorm` folds it), or "
                "`remove_normalization` for training")


def channel_scale(ev, x, vector: torch.Tensor, dim: int = 0):
    """``x`` scaled by ``vector`` along non-batch dim ``dim``."""
    if not len(x.shape) or vector.numel() != x.shape[dim]:
        ev.fail(f"a per-channel scale of {vector.numel()} entries does not match the input's shape {x.shape}")
    shape = [1] * len(x.shape)
    shape[dim] = -1
    return ev.linear(x, Scale(x.shape, vector.reshape(shape)))


def _batch_norm_scale(ev, running_var, weight, eps) -> torch.Tensor:
    scale = torch.rsqrt(running_var + eps)
    return scale * weight if weight is not None else scale


def batch_norm_module_scale(ev, m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    if m.training or m.running_var is None:
        ev.fail("BatchNorm normalises by batch statistics in training mode, which is not Lipschitz in one input",
                FIX_TRAIN_BN, NotLipschitzError)
    return _batch_norm_scale(ev, m.running_var, m.weight, m.eps)


@register_module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, kind="normalization")
def batch_norm_module(ev, module, input):
    return channel_scale(ev, input, batch_norm_module_scale(ev, module))


@register_rule(F.batch_norm)
def batch_norm(ev, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5):
    if training or running_var is None:
        ev.fail("BatchNorm in training mode is not Lipschitz in one input", FIX_EVAL, NotLipschitzError)
    return channel_scale(ev, input, _batch_norm_scale(ev, running_var, weight, eps))


@register_module_rule(cnn.Affine, kind="linear")
def affine_module(ev, module, input):
    return channel_scale(ev, input, module.weight, feature_dim(ev, module.dim, len(input.shape) + 1, "Affine"))


@register_module_rule(*timm_layers.NORM_ACT)
def batch_norm_act_module(ev, module, input):
    """timm's BatchNorm + dropout + activation in one module."""
    y = channel_scale(ev, input, batch_norm_module_scale(ev, module))
    drop = getattr(module, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        y = ev.apply_module(drop, y)
    act = getattr(module, "act", None)
    return y if act is None or isinstance(act, nn.Identity) else ev.apply_module(act, y)
