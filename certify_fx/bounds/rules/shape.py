"""Shape, layout and identity maps: reshapes, permutations, indexing, splits, concatenation, padding,
copies (flip, roll, repeat, pixel shuffle), casts and dropout.

All are linear with norm 1, except copies (``sqrt`` of the largest copy count, from the Schur
test of :class:`~..operators.NonnegativeMap`). Anything along the batch dimension is refused.
Casts keep the value only to float32/float64; the compiler refuses any input-dependent tensor of
another dtype before a rule runs.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import timm_layers
from ..operators import Concat, NonnegativeMap, Pad, Permute, Reshape, Select
from ..registry import register_module_rule, register_rule
from ..values import Refused, Tracked, TupleResult
from .common import FIX_EVAL, broadcast, feature_dim, feature_dims


def nonnegative_map(ev, x: Tracked, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Tracked:
    """A linear map with nonnegative coefficients, computed by ``fn`` on batched tensors."""
    return ev.linear(x, NonnegativeMap(x.shape, ev.shape(), fn, name))


def _reshape(ev, x: Tracked) -> Tracked:
    out = ev.shape()
    if math.prod(out) != math.prod(x.shape):
        ev.fail(f"a reshape from {x.shape} to {out} changes the number of elements of one example")
    # with the batch dim kept in front, a row-major reshape keeps every example's entries together
    return ev.linear(x, Reshape(x.shape, out)) if x.shape != out else x


@register_rule("view", "reshape", may_alias=True, sizes=("shape",))
def view(ev, input, *shape):
    return _reshape(ev, input)


@register_rule(torch.reshape, may_alias=True, sizes=("shape",))
def reshape(ev, input, shape):
    return _reshape(ev, input)


@register_rule(torch.flatten, "flatten", may_alias=True)
def flatten(ev, input, start_dim=0, end_dim=-1):
    return _reshape(ev, input)


@register_rule(torch.squeeze, "squeeze", may_alias=True)
def squeeze(ev, input, dim=None):
    return _reshape(ev, input)


@register_rule(torch.unsqueeze, "unsqueeze", may_alias=True)
def unsqueeze(ev, input, dim):
    return _reshape(ev, input)


@register_rule(torch.unflatten, "unflatten", may_alias=True, sizes=("sizes",))
def unflatten(ev, input, dim, sizes):
    return _reshape(ev, input)


@register_rule("view_as", "reshape_as", may_alias=True, shape_only=("other",))
def view_as(ev, input, other):
    return _reshape(ev, input)


@register_module_rule(nn.Flatten, nn.Unflatten, may_alias=True)
def flatten_module(ev, module, input):
    return _reshape(ev, input)


def _permute(ev, x: Tracked, dims) -> Tracked:
    ndim = len(x.shape) + 1
    dims = tuple(int(d) % ndim for d in dims)
    if sorted(dims) != list(range(ndim)):
        ev.fail(f"permute dims {dims} are not a permutation of {ndim} dims")
    if dims[0] != 0:
        ev.fail("moving the batch dimension away from dim 0 mixes the examples of a batch")
    return ev.linear(x, Permute(x.shape, tuple(d - 1 for d in dims[1:])))


@register_rule(torch.permute, may_alias=True)
def permute(ev, input, dims):
    return _permute(ev, input, dims)


@register_rule("permute", may_alias=True)
def permute_method(ev, input, *dims):
    return _permute(ev, input, dims[0] if len(dims) == 1 and not isinstance(dims[0], int) else dims)


@register_rule(torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims", may_alias=True)
def transpose(ev, input, dim0, dim1):
    ndim = len(input.shape) + 1
    dims = list(range(ndim))
    a, b = dim0 % ndim, dim1 % ndim
    dims[a], dims[b] = dims[b], dims[a]
    return _permute(ev, input, dims)


@register_rule(torch.movedim, "movedim", torch.moveaxis, "moveaxis", may_alias=True)
def movedim(ev, input, source, destination):
    ndim = len(input.shape) + 1
    source = [source] if isinstance(source, int) else list(source)
    destination = [destination] if isinstance(destination, int) else list(destination)
    order = [d for d in range(ndim) if d not in [s % ndim for s in source]]
    for dst, src in sorted(zip([d % ndim for d in destination], [s % ndim for s in source])):
        order.insert(dst, src)
    return _permute(ev, input, order)


# -- indexing and tuples ---------------------------------------------------------------------


def _is_basic(i: Any) -> bool:
    return i is None or isinstance(i, int) or (isinstance(i, slice) and all(
        v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)) and (i.step or 1) > 0)


def _feature_index(ev, index: Any, ndim: int) -> tuple:
    """The index without its batch entry, with ``...`` expanded; the batch must be taken whole."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1:
        ev.fail("an index with more than one `...`")
    consuming = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (ndim - consuming)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (ndim - sum(1 for i in expanded if i is not None))
    if not expanded or expanded[0] != slice(None):
        ev.fail("indexing the batch dimension mixes or drops examples of a batch", "index only dims after the batch")
    return tuple(expanded[1:])


@register_rule(operator.getitem, "__getitem__", inputs=("obj",), may_alias=True)
def getitem(ev, obj, index):
    if isinstance(obj, (tuple, list)):
        part = obj[index]
        return TupleResult(part) if isinstance(part, (tuple, list)) else part
    if not isinstance(obj, Tracked):
        ev.fail(f"indexing a {type(obj).__name__} that depends on the input")
    idx = _feature_index(ev, index, len(obj.shape) + 1)
    if all(_is_basic(i) for i in idx):
        return ev.linear(obj, Select(obj.shape, ev.shape(), idx))
    for i in idx:
        if isinstance(i, torch.Tensor) and i.is_floating_point():
            ev.fail("indexing with a floating-point tensor")
    # advanced indexing with constant indices copies each output from one input entry
    return nonnegative_map(ev, obj, lambda x: x[(slice(None), *idx)], "advanced indexing")


@register_rule(getattr, inputs=("obj",))
def getattr_(ev, obj, name, default=None):
    if isinstance(obj, TupleResult) and name in obj.fields:
        return obj.field(name)
    ev.fail(f"attribute {name!r} of an input-dependent value is not supported")


def _split(ev, x: Tracked, sizes: list[int], dim: int) -> TupleResult:
    parts, start = [], 0
    for size in sizes:
        index = (slice(None),) * dim + (slice(start, start + size),)
        shape = list(x.shape)
        shape[dim] = size
        parts.append(ev.linear(x, Select(x.shape, tuple(shape), index)))
        start += size
    return TupleResult(parts)


@register_rule(torch.chunk, "chunk", may_alias=True)
def chunk(ev, input, chunks, dim=0):
    d = feature_dim(ev, dim, len(input.shape) + 1, "chunk")
    size = input.shape[d]
    step = -(-size // int(chunks))
    return _split(ev, input, [min(step, size - i) for i in range(0, size, step)], d)


@register_rule(torch.split, "split", may_alias=True)
def split(ev, input, split_size_or_sections, dim=0):
    d = feature_dim(ev, dim, len(input.shape) + 1, "split")
    size, sections = input.shape[d], split_size_or_sections
    if isinstance(sections, (list, tuple)):
        sizes = [int(s) for s in sections]
    else:
        sizes = [min(int(sections), size - i) for i in range(0, size, int(sections))]
    if sum(sizes) != size:
        ev.fail(f"split sizes {sizes} do not add up to {size}")
    return _split(ev, input, sizes, d)


@register_rule(torch.unbind, "unbind", may_alias=True)
def unbind(ev, input, dim=0):
    d = feature_dim(ev, dim, len(input.shape) + 1, "unbind")
    shape = tuple(s for i, s in enumerate(input.shape) if i != d)
    return TupleResult(ev.linear(input, Select(input.shape, shape, (slice(None),) * d + (i,)))
                       for i in range(input.shape[d]))


def concat_values(ev, tensors, dim, out_shape) -> Tracked:
    """``tensors`` (input-dependent or constant) concatenated along ``dim`` (counting the batch dim)."""
    for t in tensors:
        if isinstance(t, Refused):
            ev.fail(t.reason, t.fix)
    d = feature_dim(ev, dim, len(out_shape) + 1, "concatenation")
    sizes = [(t.shape[d] if isinstance(t, Tracked) else t.shape[d + 1]) for t in tensors]
    sources = {s for t in tensors if isinstance(t, Tracked) for s in t.form}
    form = {}
    for source in sources:
        parts = [t.form.get(source) if isinstance(t, Tracked) else None for t in tensors]
        in_shape = next(p.in_shape for p in parts if p is not None)
        form[source] = Concat(in_shape, out_shape, parts, sizes, d)
    return Tracked(out_shape, form)


@register_rule(torch.cat, torch.concat, inputs=("tensors",))
def cat(ev, tensors, dim=0):
    return concat_values(ev, list(tensors), dim, ev.shape())


@register_rule(torch.concatenate, inputs=("tensors",))
def concatenate(ev, tensors, axis=0):
    return concat_values(ev, list(tensors), axis, ev.shape())


@register_rule(torch.stack, inputs=("tensors",))
def stack(ev, tensors, dim=0):
    out = ev.shape()
    d = feature_dim(ev, dim, len(out) + 1, "stack")
    unsqueezed = []
    for t in tensors:
        if isinstance(t, Tracked):
            t = ev.linear(t, Reshape(t.shape, (*t.shape[:d], 1, *t.shape[d:])))
        elif isinstance(t, torch.Tensor):
            t = t.unsqueeze(d + 1)
        unsqueezed.append(t)
    return concat_values(ev, unsqueezed, d + 1, out)


@register_rule("expand", may_alias=True, sizes=("sizes",))
def expand(ev, input, *sizes):
    return broadcast(ev, input, ev.shape())


@register_rule("expand_as", may_alias=True, shape_only=("other",))
def expand_as(ev, input, other):
    return broadcast(ev, input, ev.shape())


@register_rule(torch.broadcast_to, "broadcast_to", may_alias=True, sizes=("size",))
def broadcast_to(ev, input, size):
    return broadcast(ev, input, ev.shape())


#: padding modes that copy input elements (each output is one input element): nonnegative maps
#: whose bound sqrt(most copies of one element) is their exact norm
COPYING_PAD_MODES = ("circular", "reflect", "replicate")


def _pad(ev, x: Tracked, pads, mode: str = "constant") -> Tracked:
    if len(pads) > 2 * len(x.shape):
        ev.fail("padding the batch dimension mixes the examples of a batch")
    pads = tuple(int(p) for p in pads)
    if mode in COPYING_PAD_MODES:
        return nonnegative_map(ev, x, lambda t: F.pad(t, pads, mode=mode), f"{mode} pad {pads}")
    if mode != "constant":
        ev.fail(f"padding mode {mode!r} is not supported", f"use constant or {', '.join(COPYING_PAD_MODES)} padding")
    # constant padding (and cropping, with negative pads) is linear up to a constant, norm 1
    return ev.linear(x, Pad(x.shape, ev.shape(), pads))


@register_rule(F.pad)
def pad(ev, input, pad, mode="constant", value=None):
    return _pad(ev, input, pad, mode)


@register_module_rule(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                      kind="linear")
def pad_module(ev, module, input):
    return _pad(ev, input, module.padding)


_COPYING_PAD_MODULES = {
    "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
    "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
    "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
}


@register_module_rule(*(t for types in _COPYING_PAD_MODULES.values() for t in types), kind="linear")
def copying_pad_module(ev, module, input):
    mode = next(m for m, types in _COPYING_PAD_MODULES.items() if isinstance(module, types))
    return _pad(ev, input, module.padding, mode)


# -- copies: flips, rolls, repeats, pixel shuffles -------------------------------------------


@register_rule(torch.flip, inputs=("input",))
def flip(ev, input, dims):
    dims = tuple(d + 1 for d in feature_dims(ev, dims, len(input.shape) + 1, "flip"))
    return nonnegative_map(ev, input, lambda x: x.flip(dims), f"flip {dims}")


@register_rule("flip")
def flip_method(ev, input, *dims):
    return flip(ev, input, dims[0] if len(dims) == 1 and not isinstance(dims[0], int) else dims)


@register_rule(torch.roll, "roll")
def roll(ev, input, shifts, dims=None):
    if dims is None:
        ev.fail("roll without dims shifts the flattened tensor across the batch", "pass dims=")
    dims_ = (dims,) if isinstance(dims, int) else tuple(dims)
    feature_dims(ev, dims_, len(input.shape) + 1, "roll")
    return nonnegative_map(ev, input, lambda x: torch.roll(x, shifts, dims), "roll")


@register_rule("repeat", sizes=("sizes",))
def repeat(ev, input, *sizes):
    sizes = tuple(sizes[0]) if len(sizes) == 1 and not isinstance(sizes[0], int) else tuple(sizes)
    if len(sizes) != len(input.shape) + 1 or sizes[0] != 1:
        ev.fail("repeat must give one count per dim, with 1 for the batch dim")
    return nonnegative_map(ev, input, lambda x: x.repeat(*sizes), f"repeat {sizes}")


@register_rule(F.pixel_shuffle, torch.pixel_shuffle)
def pixel_shuffle(ev, input, upscale_factor):
    return nonnegative_map(ev, input, lambda x: F.pixel_shuffle(x, upscale_factor), "pixel_shuffle")


@register_rule(F.pixel_unshuffle, torch.pixel_unshuffle)
def pixel_unshuffle(ev, input, downscale_factor):
    return nonnegative_map(ev, input, lambda x: F.pixel_unshuffle(x, downscale_factor), "pixel_unshuffle")


@register_module_rule(nn.PixelShuffle)
def pixel_shuffle_module(ev, module, input):
    return pixel_shuffle(ev, input, module.upscale_factor)


@register_module_rule(nn.PixelUnshuffle)
def pixel_unshuffle_module(ev, module, input):
    return pixel_unshuffle(ev, input, module.downscale_factor)


# -- identities, casts, dropout --------------------------------------------------------------


@register_rule("contiguous", may_alias=True)
def contiguous(ev, input, memory_format=torch.contiguous_format):
    return input


@register_rule("clone", torch.clone)
def clone(ev, input, memory_format=torch.preserve_format):
    return input


@register_rule("detach", torch.detach, may_alias=True)
def detach(ev, input):
    return input


@register_rule("float", "double", "half", "bfloat16", "int", "long", "cpu", may_alias=True)
def cast(ev, input, memory_format=torch.preserve_format):
    return input  # the compiler has checked the result's dtype (float32/float64 only)


@register_rule("to", may_alias=True, shape_only=("args",))
def to(ev, input, *args, non_blocking=False, copy=False, memory_format=torch.preserve_format, dtype=None,
       device=None):
    return input  # `.to(other)` reads other's dtype and device only


@register_rule("type_as", may_alias=True, shape_only=("other",))
def type_as(ev, input, other):
    return input


@register_rule("type", may_alias=True)
def type_(ev, input, dtype=None, non_blocking=False):
    if dtype is None:
        ev.fail("`.type()` without a dtype returns a string")
    return input


@register_module_rule(nn.Identity, may_alias=True)
def identity_module(ev, module, input):
    return input


def _dropout(ev, input, p, training):
    if training and float(p) > 0:
        ev.fail(f"dropout with p={float(p):g} in training mode is random, so the model is not one function",
                FIX_EVAL + " (or pass training=False)")
    return input


@register_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, may_alias=True)
def dropout(ev, input, p=0.5, training=True, inplace=False):
    return _dropout(ev, input, p, training)


@register_module_rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, may_alias=True)
def dropout_module(ev, module, input):
    return _dropout(ev, input, module.p, module.training)


@register_module_rule(*timm_layers.DROP_PATH, may_alias=True)
def drop_path_module(ev, module, input):
    return _dropout(ev, input, module.drop_prob, module.training)
