"""Helpers shared by the rule families: dims without the batch, broadcasting, constant multipliers."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..operators import Expand
from ..registry import RuleContext
from ..values import Tracked

__all__ = ["FIX_NORMALIZATION", "FIX_ATTENTION", "FIX_PRODUCT", "FIX_EVAL", "feature_dims", "feature_dim", "broadcast",
           "multiplier", "int_tuple", "number"]

FIX_NORMALIZATION = (
    "replace it with a learnable per-channel Affine (pass `remove_normalization`, or "
    "`certify_fx.convert(model, to='lipschitz-vit')` for ViTs)"
)
FIX_ATTENTION = (
    "replace dot-product attention with spatial-MLP token mixing (pass `attention_to_spatial_mlp`, "
    "or `certify_fx.convert(model, to='lipschitz-vit')`)"
)
FIX_PRODUCT = (
    "remove the gate, or convert the model with `certify_fx.convert(model, to='liresnet')` "
    "(pass `linearize_residual_branches`)"
)
FIX_EVAL = "call model.eval() before bounding or certifying"


def feature_dims(ev: RuleContext, dims: int | Iterable[int] | None, ndim: int, what: str = "the operation") -> tuple[int, ...]:
    """Dims of a batched ``ndim``-d tensor as non-batch indices; refuses the batch dim and ``None``
    (which means every dim, batch included)."""
    if dims is None or (not isinstance(dims, int) and len(tuple(dims)) == 0):
        ev.fail(f"{what} over every dimension mixes the examples of a batch", "pass dim= (not the batch dim 0)")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) and -ndim <= d < ndim for d in dims):
        ev.fail(f"{what}: dims {dims} are not valid for a {ndim}-d tensor")
    normal = tuple(sorted({d % ndim for d in dims}))
    if 0 in normal:
        ev.fail(f"{what} over the batch dimension mixes the examples of a batch", "pass a dim other than 0")
    return tuple(d - 1 for d in normal)


def feature_dim(ev: RuleContext, dim: int | None, ndim: int, what: str = "the operation") -> int:
    (d,) = feature_dims(ev, dim, ndim, what)
    return d


def broadcast(ev: RuleContext, value: Tracked, shape: tuple[int, ...]) -> Tracked:
    """``value`` broadcast to ``shape`` (no batch dim): a copy map of norm sqrt(copies)."""
    return value if value.shape == tuple(shape) else ev.linear(value, Expand(value.shape, tuple(shape)))


def multiplier(ev: RuleContext, const: Any) -> torch.Tensor:
    """A constant as a multiplier broadcastable to the current node's shape (batch removed)."""
    if isinstance(const, bool) or not isinstance(const, (int, float, torch.Tensor)):
        ev.fail(f"multiplication by {type(const).__name__} is not supported")
    t = const if isinstance(const, torch.Tensor) else torch.tensor(float(const), dtype=ev.dtype)
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
        ev.fail(f"multiplication by a {t.dtype} constant is not supported")
    ndim = len(ev.shape()) + 1
    if t.dim() == ndim:
        if t.shape[0] != 1 and not bool((t == t[:1]).all()):
            ev.fail("multiplication by a constant that differs across the batch is not supported")
        t = t[0]
    elif t.dim() > ndim:
        ev.fail("a constant with more dimensions than the result")
    return t


def int_tuple(value: Any, n: int) -> tuple[int, ...]:
    """``value`` (an int or a sequence of 1 or ``n`` ints) as an ``n``-tuple."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def number(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)
