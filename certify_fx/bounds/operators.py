"""A small algebra of linear operators, folded exactly where possible and bounded soundly.

The bound compiler describes the map from each "source" (the input, or the output of a
nonlinearity) to each later node as a :class:`LinearOperator`. Every operator can be applied,
transposed (for power iteration) and bounded. :func:`compose` and :func:`add` fold what has an
exact single-operator form (conv after per-channel scaling, ``x + conv(x)``, parallel convs of one
input, pointwise convs around a conv, dense after dense) so that its norm is computed on one
operator instead of as a loose product or sum of norms.

Shapes never include the batch dimension; ``apply``/``adjoint`` take batched tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .channel_factors import ChannelFactors
from ..nn.bro import apply_frequency_response
from .norms import (NormBound, conv2d_adjoint, conv2d_norm_bound, dense_norm_bound, exact, frequency_response_norm_bound,
                    largest_singular_value, SAFETY, structured_bounds)

__all__ = [
    "LinearOperator",
    "Identity",
    "Reshape",
    "Permute",
    "Select",
    "Pad",
    "Scale",
    "Expand",
    "Reduce",
    "Conv2d",
    "Dense",
    "FourierConv2d",
    "NonnegativeMap",
    "TransposedConv2d",
    "Compose",
    "Sum",
    "Concat",
    "compose",
    "add",
    "materialize",
    "materialized_bound",
    "has_exact_bound",
]

Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


class LinearOperator:
    """A linear map between tensors of fixed shapes (batch excluded)."""

    in_shape: Shape
    out_shape: Shape

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def upper_bound(self) -> NormBound:
        """A sound upper bound on the l2 operator norm."""
        raise NotImplementedError

    def to(self, dtype: torch.dtype) -> "LinearOperator":
        """A copy whose tensors have ``dtype`` (float64 for materialising exactly)."""
        return self

    def describe(self) -> str:
        return type(self).__name__


@dataclass
class Identity(LinearOperator):
    shape: Shape

    @property
    def in_shape(self) -> Shape:  # type: ignore[override]
        return self.shape

    @property
    def out_shape(self) -> Shape:  # type: ignore[override]
        return self.shape

    def apply(self, x):
        return x

    def adjoint(self, y):
        return y

    def upper_bound(self):
        return exact(1.0)


@dataclass
class Reshape(LinearOperator):
    """Any reshape that keeps the element order (view, flatten, squeeze, ...): an isometry."""

    in_shape: Shape
    out_shape: Shape

    def apply(self, x):
        return x.reshape(x.shape[0], *self.out_shape)

    def adjoint(self, y):
        return y.reshape(y.shape[0], *self.in_shape)

    def upper_bound(self):
        return exact(1.0)

    def describe(self):
        return f"reshape {self.in_shape}->{self.out_shape}"


@dataclass
class Permute(LinearOperator):
    """A permutation of the non-batch dimensions: an isometry."""

    in_shape: Shape
    dims: tuple[int, ...]  # over non-batch dims

    @property
    def out_shape(self) -> Shape:  # type: ignore[override]
        return tuple(self.in_shape[d] for d in self.dims)

    def apply(self, x):
        return x.permute(0, *(d + 1 for d in self.dims))

    def adjoint(self, y):
        inverse = sorted(range(len(self.dims)), key=self.dims.__getitem__)
        return y.permute(0, *(d + 1 for d in inverse))

    def upper_bound(self):
        return exact(1.0)


@dataclass
class Select(LinearOperator):
    """Basic indexing (ints, slices with positive step, None) of the non-batch dims: norm 1."""

    in_shape: Shape
    out_shape: Shape
    index: tuple

    def apply(self, x):
        return x[(slice(None), *self.index)]

    def adjoint(self, y):
        x = y.new_zeros(y.shape[0], *self.in_shape)
        x[(slice(None), *self.index)] = y
        return x

    def upper_bound(self):
        return exact(1.0 if _numel(self.out_shape) else 0.0)


@dataclass
class Pad(LinearOperator):
    """Constant padding of trailing dims (``F.pad`` order); the pad value only adds a constant."""

    in_shape: Shape
    out_shape: Shape
    pads: tuple[int, ...]

    def apply(self, x):
        return F.pad(x, self.pads)

    def adjoint(self, y):
        return F.pad(y, tuple(-p for p in self.pads))

    def upper_bound(self):
        return exact(1.0)


@dataclass
class Scale(LinearOperator):
    """Elementwise multiplication by a constant tensor broadcastable to ``in_shape``."""

    shape: Shape
    multiplier: torch.Tensor  # broadcastable to shape (no batch dim)

    @property
    def in_shape(self) -> Shape:  # type: ignore[override]
        return self.shape

    @property
    def out_shape(self) -> Shape:  # type: ignore[override]
        return self.shape

    def apply(self, x):
        return x * self.multiplier

    adjoint = apply

    def upper_bound(self):
        return exact(self.multiplier.detach().abs().max().item() if self.multiplier.numel() else 0.0)

    def to(self, dtype):
        return replace(self, multiplier=self.multiplier.to(dtype))

    def along(self, dim: int) -> torch.Tensor | None:
        """The per-index vector if the multiplier varies only along ``dim`` (or is a scalar)."""
        m = self.multiplier
        ndim = len(self.shape)
        m = m.reshape((1,) * (ndim - m.dim()) + tuple(m.shape)) if m.dim() < ndim else m
        if m.dim() != ndim:
            return None
        dim = dim % ndim
        if any(s != 1 for i, s in enumerate(m.shape) if i != dim):
            return None
        return m.reshape(-1).expand(self.shape[dim])

    def describe(self):
        return "scale" if self.multiplier.numel() > 1 else f"scale {self.multiplier.item():.4g}"


@dataclass
class Expand(LinearOperator):
    """Broadcast copy (``expand`` or implicit broadcasting in ``+``): norm sqrt(copies)."""

    in_shape: Shape
    out_shape: Shape

    def apply(self, x):
        return x.reshape(x.shape[0], *((1,) * (len(self.out_shape) - len(self.in_shape))), *self.in_shape).expand(
            x.shape[0], *self.out_shape
        )

    def adjoint(self, y):
        lead = len(self.out_shape) - len(self.in_shape)
        y = y.sum(dim=tuple(range(1, 1 + lead))) if lead else y
        dims = tuple(i + 1 for i, (a, b) in enumerate(zip(self.in_shape, self.out_shape[lead:])) if a == 1 and b != 1)
        return y.sum(dim=dims, keepdim=True) if dims else y

    def upper_bound(self):
        return exact(math.sqrt(_numel(self.out_shape) / max(_numel(self.in_shape), 1)))


@dataclass
class Reduce(LinearOperator):
    """``scale * x.sum(dims)`` over non-batch ``dims`` (mean: ``scale = 1/count``): norm scale*sqrt(count)."""

    in_shape: Shape
    out_shape: Shape
    dims: tuple[int, ...]  # non-batch dims
    scale: float

    def apply(self, x):
        return (x.sum(dim=tuple(d + 1 for d in self.dims)) * self.scale).reshape(x.shape[0], *self.out_shape)

    def adjoint(self, y):
        kept = tuple(1 if i in self.dims else s for i, s in enumerate(self.in_shape))
        return (y.reshape(y.shape[0], *kept) * self.scale).expand(y.shape[0], *self.in_shape)

    def upper_bound(self):
        count = math.prod(self.in_shape[d] for d in self.dims)
        return exact(abs(self.scale) * math.sqrt(count))

    def describe(self):
        return f"{'mean' if self.scale != 1 else 'sum'} over {self.dims}"


@dataclass
class Conv2d(LinearOperator):
    """``conv2d(pad(x, padding), weight, stride, dilation, groups)`` without bias.

    ``padding`` is (top, bottom, left, right) and may be asymmetric or negative (cropping), which is
    what exact folding of parallel convs needs. ``factors`` records how a folded kernel factors
    through fewer channels (:mod:`.channel_factors`), which makes its bound a smaller problem.
    """

    in_shape: Shape  # (C, H, W)
    weight: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    out_shape: Shape = field(default=())
    factors: ChannelFactors | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not self.out_shape:
            t, b, l, r = self.padding
            h, w = self.in_shape[1] + t + b, self.in_shape[2] + l + r
            kh, kw = self.weight.shape[-2:]
            (sh, sw), (dh, dw) = self.stride, self.dilation
            self.out_shape = (
                self.weight.shape[0],
                (h - dh * (kh - 1) - 1) // sh + 1,
                (w - dw * (kw - 1) - 1) // sw + 1,
            )

    def apply(self, x):
        t, b, l, r = self.padding
        x = F.pad(x, (l, r, t, b)) if any(self.padding) else x
        return F.conv2d(x, self.weight, stride=self.stride, dilation=self.dilation, groups=self.groups)

    def adjoint(self, y):
        return conv2d_adjoint(y, self.weight, self.in_shape[1:], self.stride, self.padding, self.dilation, self.groups)

    def upper_bound(self):
        factors = self.channel_factors
        if factors is not None and structured_bounds():
            square = self.stride == (1, 1) and self.dilation == (1, 1)
            reduced = factors.reduced(square)
            if reduced is not None:
                kernel, floor = reduced
                bound = conv2d_norm_bound(kernel, self.in_shape[1:], self.stride, self.padding, self.dilation,
                                          at_least=floor)
                return replace(bound, method=f"{bound.method} (channel-reduced)")
        return conv2d_norm_bound(self.weight, self.in_shape[1:], self.stride, self.padding, self.dilation, self.groups)

    def to(self, dtype):
        weight = self.weight.to(dtype)
        factors = self.channel_factors
        return replace(self, weight=weight, factors=None if factors is None else factors.to(weight))

    @property
    def channel_factors(self) -> ChannelFactors | None:
        """The factors of this kernel, if it has any (factors of another kernel do not count)."""
        factors = self.factors
        return factors if factors is not None and factors.of is self.weight and self.groups == 1 else None

    @property
    def is_pointwise(self) -> bool:
        return self.weight.shape[-2:] == (1, 1) and not any(self.padding)

    def trimmed(self) -> "Conv2d":
        """The same map without the kernel taps that only ever read zero padding (a 7x7 stride-2
        kernel on a 2x2 map reads the input through a 2x2 window), or ``self``."""
        if self.dilation != (1, 1):
            return self
        weight, padding, factors = self.weight, list(self.padding), self.channel_factors
        for axis in (0, 1):
            size, kernel, stride = self.in_shape[1 + axis], weight.shape[2 + axis], self.stride[axis]
            before, after = padding[2 * axis], padding[2 * axis + 1]
            first = max(0, before - stride * (self.out_shape[1 + axis] - 1))
            last = min(kernel - 1, before + size - 1)
            if last < first:
                return self
            weight = weight.narrow(2 + axis, first, last - first + 1)
            if factors is not None:
                factors = factors.narrowed(weight, axis, first, last - first + 1)
            padding[2 * axis], padding[2 * axis + 1] = before - first, after - (kernel - 1 - last)
        if weight.shape == self.weight.shape:
            return self
        trimmed = replace(self, weight=weight, padding=tuple(padding), out_shape=(), factors=factors)
        return trimmed if trimmed.out_shape == self.out_shape else self

    def dense_weight(self) -> torch.Tensor:
        """The kernel with groups expanded into a block-diagonal full kernel."""
        if self.groups == 1:
            return self.weight
        o, c_g, kh, kw = self.weight.shape
        g, o_g = self.groups, o // self.groups
        full = self.weight.new_zeros(o, c_g * g, kh, kw)
        for i in range(g):
            full[i * o_g : (i + 1) * o_g, i * c_g : (i + 1) * c_g] = self.weight[i * o_g : (i + 1) * o_g]
        return full

    def describe(self):
        k = "x".join(map(str, self.weight.shape[-2:]))
        s = f" s{self.stride[0]}" if self.stride != (1, 1) else ""
        g = f" g{self.groups}" if self.groups > 1 else ""
        return f"conv{k}{s}{g} {self.weight.shape[1] * self.groups}->{self.weight.shape[0]}"


@dataclass
class Dense(LinearOperator):
    """``x @ weight.T`` over the last dimension (any leading dims are shared)."""

    in_shape: Shape
    weight: torch.Tensor  # (out_features, in_features)

    @property
    def out_shape(self) -> Shape:  # type: ignore[override]
        return (*self.in_shape[:-1], self.weight.shape[0])

    def apply(self, x):
        return x @ self.weight.T

    def adjoint(self, y):
        return y @ self.weight

    def upper_bound(self):
        return dense_norm_bound(self.weight)

    def to(self, dtype):
        return replace(self, weight=self.weight.to(dtype))

    def describe(self):
        return f"dense {self.weight.shape[1]}->{self.weight.shape[0]}"


@dataclass
class NonnegativeMap(LinearOperator):
    """A linear map with nonnegative coefficients given as a function: flips, rolls, repeats, pixel
    (un)shuffles, nearest and (bi)linear resampling.

    Bounded by the Schur test, ``||A||_2 <= sqrt(||A||_1 ||A||_inf)``, whose two factors are for a
    nonnegative ``A`` the largest entries of ``A 1`` and ``A^T 1``; it is exact for maps that copy
    each output from one input (``sqrt`` of the largest copy count). The adjoint comes from autograd.
    """

    in_shape: Shape
    out_shape: Shape
    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str = "map"

    def apply(self, x):
        return self.fn(x)

    def adjoint(self, y):
        with torch.enable_grad():
            x = torch.zeros(y.shape[0], *self.in_shape, dtype=y.dtype, device=y.device, requires_grad=True)
            (grad,) = torch.autograd.grad(self.fn(x), x, y, create_graph=y.requires_grad)
        return grad

    def upper_bound(self):
        with torch.no_grad():
            rows = self.fn(torch.ones(1, *self.in_shape, dtype=torch.float64)).max().item()
            cols = self.adjoint(torch.ones(1, *self.out_shape, dtype=torch.float64)).max().item()
        return NormBound(math.sqrt(max(rows, 0.0) * max(cols, 0.0)) * (1 + SAFETY), True, "schur")

    def describe(self):
        return self.name


@dataclass
class TransposedConv2d(LinearOperator):
    """``conv_transpose2d``: exactly the adjoint of ``conv`` (a :class:`Conv2d` from this map's output
    shape to its input shape), so it has the same norm and the same sound bound."""

    conv: Conv2d

    @property
    def in_shape(self) -> Shape:  # type: ignore[override]
        return self.conv.out_shape

    @property
    def out_shape(self) -> Shape:  # type: ignore[override]
        return self.conv.in_shape

    def apply(self, x):
        return self.conv.adjoint(x)

    def adjoint(self, y):
        return self.conv.apply(y)

    def upper_bound(self):
        return self.conv.upper_bound()

    def to(self, dtype):
        return TransposedConv2d(self.conv.to(dtype))

    def describe(self):
        return f"transposed {self.conv.describe()}"


@dataclass
class FourierConv2d(LinearOperator):
    """``crop(C(pad(x)))``: zero padding by ``padding`` on each side, the circular convolution ``C``
    on the padded grid given by its frequency response (``(H + 2p, (W + 2p) // 2 + 1, c_out, c_in)``
    complex, the half spectrum :func:`torch.fft.rfft2` keeps), and the crop back to ``H x W``.

    Padding and cropping have norm at most 1, so the largest norm of a response matrix bounds the map.
    """

    in_shape: Shape  # (C, H, W)
    response: torch.Tensor
    padding: int

    @property
    def out_shape(self) -> Shape:  # type: ignore[override]
        return (self.response.shape[-2], *self.in_shape[1:])

    def _through(self, x: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        p = self.padding
        y = apply_frequency_response(F.pad(x, (p, p, p, p)), response)
        return y[..., p:y.shape[-2] - p, p:y.shape[-1] - p]

    def apply(self, x):
        return self._through(x, self.response)

    def adjoint(self, y):
        return self._through(y, self.response.mH)

    def upper_bound(self):
        return frequency_response_norm_bound(self.response)

    def to(self, dtype):
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return replace(self, response=self.response.to(complex_dtype))

    def describe(self):
        return f"fourier conv {self.response.shape[-1]}->{self.response.shape[-2]}"


@dataclass
class Compose(LinearOperator):
    """``ops[-1] o ... o ops[0]`` (applied first to last); bounded by the product of norms."""

    ops: list[LinearOperator]

    @property
    def in_shape(self) -> Shape:  # type: ignore[override]
        return self.ops[0].in_shape

    @property
    def out_shape(self) -> Shape:  # type: ignore[override]
        return self.ops[-1].out_shape

    def apply(self, x):
        for op in self.ops:
            x = op.apply(x)
        return x

    def adjoint(self, y):
        for op in reversed(self.ops):
            y = op.adjoint(y)
        return y

    def upper_bound(self):
        bound = exact(1.0)
        for op in self.ops:
            bound = bound * op.upper_bound()
        return bound

    def to(self, dtype):
        return Compose([op.to(dtype) for op in self.ops])

    def describe(self):
        return " . ".join(op.describe() for op in reversed(self.ops))


@dataclass
class Sum(LinearOperator):
    """``sum(op(x) for op in ops)``; bounded by the sum of norms (triangle inequality)."""

    ops: list[LinearOperator]

    @property
    def in_shape(self) -> Shape:  # type: ignore[override]
        return self.ops[0].in_shape

    @property
    def out_shape(self) -> Shape:  # type: ignore[override]
        return self.ops[0].out_shape

    def apply(self, x):
        return sum(op.apply(x) for op in self.ops)

    def adjoint(self, y):
        return sum(op.adjoint(y) for op in self.ops)

    def upper_bound(self):
        bound = self.ops[0].upper_bound()
        for op in self.ops[1:]:
            bound = bound + op.upper_bound()
        return bound

    def to(self, dtype):
        return Sum([op.to(dtype) for op in self.ops])

    def describe(self):
        return "(" + " + ".join(op.describe() for op in self.ops) + ")"


@dataclass
class Concat(LinearOperator):
    """Stack of operators of one input along ``dim`` (a missing part is zero): norm <= sqrt(sum ||A_k||^2)."""

    in_shape: Shape
    out_shape: Shape
    parts: list[LinearOperator | None]
    sizes: list[int]
    dim: int  # non-batch dim

    def apply(self, x):
        outs = []
        for op, size in zip(self.parts, self.sizes):
            if op is None:
                shape = list(self.out_shape)
                shape[self.dim] = size
                outs.append(x.new_zeros(x.shape[0], *shape))
            else:
                outs.append(op.apply(x))
        return torch.cat(outs, dim=self.dim + 1)

    def adjoint(self, y):
        total = None
        for op, chunk in zip(self.parts, y.split(self.sizes, dim=self.dim + 1)):
            if op is not None:
                part = op.adjoint(chunk)
                total = part if total is None else total + part
        return total if total is not None else y.new_zeros(y.shape[0], *self.in_shape)

    def upper_bound(self):
        shared = self._shared_selection()
        if shared is not None:
            return shared
        bounds = [op.upper_bound() for op in self.parts if op is not None]
        return NormBound(
            math.sqrt(sum(b.value**2 for b in bounds)),
            all(b.sound for b in bounds),
            "+".join(sorted({b.method for b in bounds})) or "exact",
        )

    def _shared_selection(self) -> NormBound | None:
        """Parts that are one shared map ``P`` followed by selections of its entries (the halves of
        a conv's output stacked for MinMax, ``cat([max(a, b), min(a, b)])`` of one sorted pair):
        each output is one entry of ``P``'s output, so the stack is ``S P`` with ``S`` a selection
        whose norm is exactly the square root of the most copies of one entry (1 for disjoint
        parts, a permutation), and ``||S P|| <= sqrt(copies) ||P||``."""
        parts = [_steps(op) for op in self.parts if op is not None]
        if not parts:
            return None
        shared = 0
        while all(len(p) > shared and p[shared] is parts[0][shared] for p in parts):
            shared += 1
        rests = [p[shared:] for p in parts]
        if not all(isinstance(o, _SELECTIONS) for rest in rests for o in rest):
            return None
        prefix = parts[0][:shared]
        shape = prefix[-1].out_shape if prefix else self.in_shape
        counts = torch.zeros(1, *shape)
        for rest in rests:
            y = torch.ones(1, *(rest[-1].out_shape if rest else shape))
            for op in reversed(rest):
                y = op.adjoint(y)
            counts = counts + y
        bound = exact(math.sqrt(float(counts.max())))
        for op in prefix:
            bound = bound * op.upper_bound()
        return bound

    def to(self, dtype):
        return replace(self, parts=[None if op is None else op.to(dtype) for op in self.parts])

    def describe(self):
        return "concat(" + ", ".join("0" if op is None else op.describe() for op in self.parts) + ")"


# ---------------------------------------------------------------------------------------------
# Exact folding


def _flatten(kind: type, ops: Sequence[LinearOperator]) -> list[LinearOperator]:
    out: list[LinearOperator] = []
    for op in ops:
        out.extend(op.ops if isinstance(op, kind) else [op])  # type: ignore[attr-defined]
    return out


def _as_conv(op: LinearOperator, like: torch.Tensor | None = None) -> Conv2d | None:
    """View identity / per-channel scaling on (C, H, W) tensors as a pointwise conv."""
    if isinstance(op, Conv2d):
        return op
    if len(op.in_shape) != 3 or op.in_shape != op.out_shape:
        return None
    c = op.in_shape[0]
    like = like if like is not None else torch.ones(())
    if isinstance(op, Identity):
        diag = like.new_ones(c)
    elif isinstance(op, Scale) and (vec := op.along(0)) is not None:
        diag = vec.to(like)
    else:
        return None
    return Conv2d(op.in_shape, torch.diag(diag).reshape(c, c, 1, 1))


def _scale_out_channels(conv: Conv2d, vec: torch.Tensor) -> Conv2d:
    weight = conv.weight * vec.to(conv.weight).reshape(-1, 1, 1, 1)
    factors = conv.channel_factors
    return replace(conv, weight=weight, factors=factors and factors.scaled(vec, weight, "out"))


def _scale_in_channels(conv: Conv2d, vec: torch.Tensor) -> Conv2d:
    o, c_g = conv.weight.shape[:2]
    g = conv.groups
    per_out = vec.to(conv.weight).reshape(g, 1, c_g).expand(g, o // g, c_g).reshape(o, c_g)
    weight = conv.weight * per_out[:, :, None, None]
    factors = conv.channel_factors
    return replace(conv, weight=weight, factors=factors and factors.scaled(vec, weight, "in"))


def _fold_pair(inner: LinearOperator, outer: LinearOperator) -> LinearOperator | None:
    """``outer o inner`` as one operator when that is exact, else None."""
    if isinstance(inner, Identity):
        return outer
    if isinstance(outer, Identity):
        return inner
    if isinstance(outer, Reshape) and isinstance(inner, Reshape):
        if inner.in_shape == outer.out_shape:
            return Identity(inner.in_shape)
        return Reshape(inner.in_shape, outer.out_shape)
    if isinstance(outer, Scale) and isinstance(inner, Scale):
        return Scale(inner.shape, inner.multiplier * outer.multiplier)
    if isinstance(outer, Scale) and isinstance(inner, Conv2d) and (vec := outer.along(0)) is not None:
        return _scale_out_channels(inner, vec)
    if isinstance(inner, Scale) and isinstance(outer, Conv2d) and (vec := inner.along(0)) is not None:
        return _scale_in_channels(outer, vec)
    if isinstance(outer, Scale) and isinstance(inner, Dense) and (vec := outer.along(-1)) is not None:
        return replace(inner, weight=inner.weight * vec.to(inner.weight)[:, None])
    if isinstance(inner, Scale) and isinstance(outer, Dense) and (vec := inner.along(-1)) is not None:
        return replace(outer, weight=outer.weight * vec.to(outer.weight)[None, :])
    if isinstance(outer, Dense) and isinstance(inner, Dense):
        if outer.weight.shape[0] * inner.weight.shape[1] <= outer.weight.numel() + inner.weight.numel():
            return Dense(inner.in_shape, outer.weight @ inner.weight)
        return None
    if isinstance(outer, Conv2d) and isinstance(inner, Conv2d):
        return _fold_convs(inner, outer)
    return None


def _fold_convs(inner: Conv2d, outer: Conv2d) -> Conv2d | None:
    # A pointwise stride-s conv after any conv samples that conv's output then mixes channels.
    if outer.is_pointwise:
        w2 = outer.dense_weight()[:, :, 0, 0]
        w1 = inner.dense_weight()
        weight = torch.einsum("om,mikl->oikl", w2, w1)
        stride = (inner.stride[0] * outer.stride[0], inner.stride[1] * outer.stride[1])
        factors = _mixed_after(inner, w1, w2, weight)
        return Conv2d(inner.in_shape, weight, stride, inner.padding, inner.dilation, 1, factors=factors)
    # Any conv after a stride-1 pointwise conv: mix channels first, then convolve.
    if inner.is_pointwise and inner.stride == (1, 1):
        return _mixed_before(inner, outer, outer.padding)
    # A conv without padding after any conv reads only values the inner conv computed from the
    # (padded) input: the two are one conv whose kernel is the outer kernel's taps, spaced by the
    # inner stride, over the inner kernel (a factored LiResNet branch whose padding sits first).
    if not any(outer.padding) and inner.dilation == outer.dilation == (1, 1):
        if inner.weight.shape[-2:] == (1, 1) and inner.stride == (1, 1):
            folded = _mixed_before(inner, outer, inner.padding)  # the padding moves with the 1x1 conv
            return folded if folded.out_shape == outer.out_shape else None
        weight = F.conv_transpose2d(outer.dense_weight(), inner.dense_weight(), stride=inner.stride)
        stride = (inner.stride[0] * outer.stride[0], inner.stride[1] * outer.stride[1])
        folded = Conv2d(inner.in_shape, weight, stride, inner.padding)
        return folded if folded.out_shape == outer.out_shape else None
    return None


def _mixed_after(inner: Conv2d, kernel: torch.Tensor, matrix: torch.Tensor, weight: torch.Tensor) -> ChannelFactors:
    """The channel factors of ``matrix @ kernel_t``, the folded ``weight`` of a 1x1 conv after ``inner``."""
    factors = inner.channel_factors
    mixed = factors.then_mix(matrix, weight) if factors is not None else None
    return mixed or ChannelFactors(of=weight, core=kernel, left=matrix)


def _mixed_before(inner: Conv2d, outer: Conv2d, padding: tuple[int, int, int, int]) -> Conv2d:
    """``outer`` after the stride-1 1x1 conv ``inner`` as one conv with ``padding``: channels are
    mixed first, then convolved; the factors keep the mixing apart."""
    w2 = outer.dense_weight()
    w1 = inner.dense_weight()[:, :, 0, 0]
    weight = torch.einsum("omkl,mi->oikl", w2, w1)
    factors = outer.channel_factors
    mixed = factors.after_mix(w1, weight) if factors is not None else None
    mixed = mixed or ChannelFactors(of=weight, core=w2, right=w1)
    return Conv2d(inner.in_shape, weight, outer.stride, padding, outer.dilation, 1, factors=mixed)


def compose(outer: LinearOperator, inner: LinearOperator) -> LinearOperator:
    """``outer o inner``, folded into fewer operators wherever that is exact."""
    ops = _flatten(Compose, [inner, outer])
    changed = True
    while changed and len(ops) > 1:
        changed = False
        for i in range(len(ops) - 1):
            folded = _fold_pair(ops[i], ops[i + 1])
            if folded is not None:
                ops[i : i + 2] = [folded]
                changed = True
                break
    return ops[0] if len(ops) == 1 else Compose(ops)


def _merge_convs(convs: list[Conv2d]) -> Conv2d | None:
    """Sum of convs of one input with the same stride: one conv whose kernel covers all windows."""
    first = convs[0]
    if any(c.stride != first.stride or c.dilation != (1, 1) and not c.is_pointwise for c in convs):
        return None
    if any(c.out_shape != first.out_shape for c in convs):
        return None
    # Per axis, a conv reads offsets [-pad_lo, -pad_lo + k - 1] around o * stride.
    lo = [max(c.padding[2 * a] for c in convs) for a in (0, 1)]
    hi = [max(c.weight.shape[2 + a] - 1 - c.padding[2 * a] for c in convs) for a in (0, 1)]
    kh, kw = lo[0] + hi[0] + 1, lo[1] + hi[1] + 1
    same_groups = all(c.groups == first.groups for c in convs)
    groups = first.groups if same_groups else 1
    weight = None
    for c in convs:
        w = c.weight if same_groups else c.dense_weight()
        oh, ow = lo[0] - c.padding[0], lo[1] - c.padding[2]
        placed = F.pad(w, (ow, kw - ow - w.shape[-1], oh, kh - oh - w.shape[-2]))
        weight = placed if weight is None else weight + placed
    _, n_h, n_w = first.in_shape
    _, out_h, out_w = first.out_shape
    # right/bottom padding so the merged conv yields exactly the same output positions
    bottom = (out_h - 1) * first.stride[0] + kh - lo[0] - n_h
    right = (out_w - 1) * first.stride[1] + kw - lo[1] - n_w
    merged = Conv2d(first.in_shape, weight, first.stride, (lo[0], bottom, lo[1], right), (1, 1), groups)
    return merged if merged.out_shape == first.out_shape else None


def _joined_factors(merged: Conv2d, parts: list[LinearOperator]) -> Conv2d:
    """``merged`` (the sum of ``parts``) with channel factors when its parts have them: ``a I + conv``
    for a factored stride-1 ``conv`` (a residual block whose branch is a bottleneck), or a sum of
    factored and 1x1 convs (a downsampling block and its projection shortcut)."""
    if merged.groups != 1:
        return merged
    top, left = merged.padding[0], merged.padding[2]
    scalars = [1.0 if isinstance(op, Identity) else float(op.multiplier) for op in parts
               if isinstance(op, Identity) or (isinstance(op, Scale) and op.multiplier.numel() == 1)]
    convs = [op for op in parts if isinstance(op, Conv2d)]
    if len(scalars) == 1 and len(convs) == 1 and len(parts) == 2:
        conv = convs[0]
        factors = conv.channel_factors
        if factors is None or conv.stride != (1, 1) or conv.dilation != (1, 1):
            return merged
        placed = factors.placed(merged.weight, (top - conv.padding[0], left - conv.padding[2]))
        return replace(merged, factors=placed.plus_identity(merged.weight, scalars[0], (top, left)))
    if len(convs) != len(parts) or any(c.dilation != (1, 1) for c in convs):
        return merged
    factored = []
    for conv in convs:
        factors = conv.channel_factors
        if factors is None and conv.is_pointwise and conv.groups == 1:
            factors = ChannelFactors.of_pointwise(conv.weight)
        if factors is None:
            return merged
        factored.append((factors, (top - conv.padding[0], left - conv.padding[2])))
    return replace(merged, factors=ChannelFactors.stacked(merged.weight, factored))


def _steps(op: LinearOperator) -> list[LinearOperator]:
    return list(op.ops) if isinstance(op, Compose) else [op]


#: operators whose every output entry is one input entry (norm 1, adjoint a scatter)
_SELECTIONS = (Identity, Select, Reshape, Permute)


def _conjugated(op: LinearOperator) -> tuple[Permute, LinearOperator, Permute] | None:
    """``op = Q^T X Q`` with ``Q`` a permutation of dims (token mixing: tokens to the last dim, a
    dense map, back): ``(Q, X, Q^T)``, else None."""
    steps = _steps(op)
    if len(steps) < 3 or not isinstance(steps[0], Permute) or not isinstance(steps[-1], Permute):
        return None
    first, last = steps[0], steps[-1]
    if any(first.dims[last.dims[i]] != i for i in range(len(first.dims))):
        return None
    middle = steps[1:-1]
    return first, (middle[0] if len(middle) == 1 else Compose(middle)), last


def add(a: LinearOperator, b: LinearOperator) -> LinearOperator:
    """``a + b`` (both of one input), folded into one operator wherever that is exact: a common
    first step is factored out (``P + R P = (I + R) P``, a residual branch on a shared value), and
    the identity joins a map conjugated by a permutation (``I + Q^T X Q = Q^T (I + X) Q``: a token
    mixing residual is one dense map over tokens)."""
    for identity, other in ((a, b), (b, a)):
        parts = _conjugated(other) if isinstance(identity, Identity) else None
        if parts is not None:
            first, middle, last = parts
            return compose(last, compose(add(Identity(middle.in_shape), middle), first))
    first_a, first_b = _steps(a), _steps(b)
    shared = 0
    while shared < min(len(first_a), len(first_b)) and first_a[shared] is first_b[shared]:
        shared += 1
    if shared and not isinstance(first_a[0], Identity):
        prefix = first_a[:shared]
        shape = prefix[-1].out_shape
        rest_a = Compose(first_a[shared:]) if len(first_a) > shared + 1 else (
            first_a[shared] if len(first_a) > shared else Identity(shape))
        rest_b = Compose(first_b[shared:]) if len(first_b) > shared + 1 else (
            first_b[shared] if len(first_b) > shared else Identity(shape))
        inner = prefix[0] if len(prefix) == 1 else Compose(prefix)
        return compose(add(rest_a, rest_b), inner)
    ops = _flatten(Sum, [a, b])
    like = next((op.weight for op in ops if isinstance(op, Conv2d)), None)
    convs = [c for op in ops if (c := _as_conv(op, like)) is not None]
    if len(convs) >= 2 and like is not None:
        merged = _merge_convs(convs)
        if merged is not None:
            joined = [op for op in ops if _as_conv(op) is not None]
            ops = [_joined_factors(merged, joined)] + [op for op in ops if _as_conv(op) is None]
    denses = [op for op in ops if isinstance(op, Dense)]
    if denses:
        others = [op for op in ops if not isinstance(op, Dense)]
        weight = sum(d.weight for d in denses)
        rest = []
        for op in others:
            if isinstance(op, Identity) and weight.shape[0] == weight.shape[1]:
                weight = weight + torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
            elif isinstance(op, Scale) and (vec := op.along(-1)) is not None and weight.shape[0] == weight.shape[1]:
                weight = weight + torch.diag(vec.to(weight))
            else:
                rest.append(op)
        ops = [Dense(denses[0].in_shape, weight)] + rest
    scales = [op for op in ops if isinstance(op, (Scale, Identity))]
    if len(scales) >= 2:
        mult = sum(op.multiplier if isinstance(op, Scale) else torch.ones(()) for op in scales)
        ops = [Scale(scales[0].in_shape, mult)] + [op for op in ops if not any(op is s for s in scales)]
    return ops[0] if len(ops) == 1 else Sum(ops)


def materialize(op: LinearOperator) -> torch.Tensor:
    """The matrix of ``op`` (out_numel x in_numel), in float64."""
    op64 = op.to(torch.float64)
    n = _numel(op.in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *op.in_shape)
    return op64.apply(basis).reshape(n, -1).T


def materialized_bound(op: LinearOperator) -> NormBound:
    """Exact norm of a small operator from its materialised matrix (plus float64 slack)."""
    matrix = materialize(op)
    sigma = largest_singular_value(matrix).item() if matrix.numel() else 0.0
    return NormBound(sigma * (1 + SAFETY), True, "svd (materialised)")


def has_exact_bound(op: LinearOperator) -> bool:
    """True when ``upper_bound()`` is already the exact norm (no point materialising)."""
    if isinstance(op, Compose):
        # orthogonal reshapes/permutations on either side do not change the norm
        others = [o for o in op.ops if not isinstance(o, (Identity, Reshape, Permute))]
        return len(others) <= 1 and all(has_exact_bound(o) for o in others)
    if isinstance(op, (Dense, Identity, Reshape, Permute, Select, Pad, Scale, Reduce, Expand)):
        return True
    return isinstance(op, Conv2d) and tuple(op.weight.shape[-2:]) == tuple(op.stride) and not any(op.padding)
