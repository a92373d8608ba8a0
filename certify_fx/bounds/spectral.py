"""Fourier-domain regions: FFT-parameterised layers (Cayley, LOT, BRO, Sandwich) as one linear map.

An FFT-parameterised convolution takes the FFT of its input, moves the batch out of the front
(``rfft2(x).permute(2, 3, 1, 0)``), multiplies each frequency by a constant complex matrix and
transforms back. No single node of that is a real, batch-first tensor the rules could bound,
but the stretch from the FFT to the first real, batch-first value is: a *region*. When every
node of a region is an op that is (real-)linear in the input-dependent arguments it takes
(transforms, reshapes and permutations, conjugation, products and sums with constants: see
:data:`LINEAR_OPS`), the region computes an affine map of its input ``u``; the compiler
materialises its linear part ``x -> R(x) - R(0)`` by running the region's own nodes on basis
vectors and bounds it exactly (:class:`RegionMap`). A region that holds any other op, lets a
complex or batch-moved value escape, or is too large to materialise is refused at its FFT.

The region runs at the example batch size the graph was recorded with (sizes such as
``x.shape[0]`` inside it are those of that run), and the example runs check, at the region's
exits, that each example's output depends only on that example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .dependence import Dependence, nodes_in
from .operators import LinearOperator, materialized_bound
from .values import Shape

__all__ = ["FFT_NAMES", "LINEAR_OPS", "Region", "find_regions", "RegionMap"]

#: the Fourier transforms (torch.fft functions and their ATen names)
FFT_NAMES = frozenset({"fft", "ifft", "fft2", "ifft2", "fftn", "ifftn", "rfft", "irfft", "rfft2", "irfft2", "rfftn",
                       "irfftn", "hfft", "ihfft"})
#: ops linear in every input-dependent argument they take, given constant others
_STRUCTURAL = frozenset({
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "reshape", "view", "flatten", "unflatten",
    "squeeze", "unsqueeze", "contiguous", "clone", "expand", "t", "mT", "conj", "conj_physical", "resolve_conj",
    "real", "imag", "view_as_real", "view_as_complex", "getitem", "select", "slice", "cat", "stack", "chunk", "split",
    "unbind", "neg", "_unsafe_view", "alias", "lift_fresh_copy", "roll", "flip",
})
#: ops linear in each input-dependent argument when at most one argument is input-dependent
_PRODUCTS = frozenset({"matmul", "mm", "bmm", "mul", "einsum", "div", "__matmul__", "__mul__", "__truediv__",
                       "truediv", "multiply", "divide", "true_divide"})
#: ops that are linear when every argument is input-dependent, affine when some are constants
_SUMS = frozenset({"add", "sub", "__add__", "__sub__", "__radd__", "__rsub__", "subtract", "rsub"})
LINEAR_OPS = FFT_NAMES | _STRUCTURAL | _PRODUCTS | _SUMS

#: the largest region input or output (entries per example) the compiler materialises
REGION_LIMIT = 4096


def op_name(node: fx.Node) -> str:
    """``rfft2`` for torch.fft.rfft2, aten.fft_rfft2 or a method ``rfft2``; ``getitem``, ``add``, ..."""
    if node.op == "call_method":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", str(target))
    return name[4:] if name.startswith("fft_") else name  # torch.fft.rfft2 is named fft_rfft2


@dataclass
class Region:
    """An FFT of the input-dependent ``source`` and the nodes up to its real, batch-first ``exits``."""

    source: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)  # in graph order, the FFT first
    exits: list[fx.Node] = field(default_factory=list)
    refusal: str | None = None  #: why the stretch is not a linear region (then its FFT is refused)


def _batch_first(name: str, two: dict, three: dict, batch: int) -> bool:
    a, b = two.get(name), three.get(name)
    return bool(a) and bool(b) and a[0] == batch and b[0] == batch + 1 and a[1:] == b[1:]


def find_regions(gm: fx.GraphModule, dependence: dict[fx.Node, Dependence], shapes: dict, other_shapes: dict,
                 dtypes: dict, batch: int) -> list[Region]:
    """Every region that starts at an FFT of an input-dependent tensor (see the module docstring)."""
    regions: list[Region] = []
    claimed: set[fx.Node] = set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if node in claimed or node.op not in ("call_function", "call_method") or op_name(node) not in FFT_NAMES:
            continue
        inputs = [a for a in nodes_in((node.args, node.kwargs)) if dependence.get(a) == Dependence.INPUT]
        if dependence.get(node) != Dependence.INPUT or len(inputs) != 1:
            continue
        region = Region(inputs[0])
        frontier, members = [node], {node}
        while frontier:
            current = frontier.pop()
            real = dtypes.get(current.name) in (torch.float32, torch.float64)
            if current is not node and real and _batch_first(current.name, shapes, other_shapes, batch):
                region.exits.append(current)  # a real, batch-first value: the region's output
                continue
            for user in current.users:  # reads of its shape or dtype are not part of the map
                if user not in members and dependence.get(user) == Dependence.INPUT:
                    members.add(user)
                    frontier.append(user)
        region.nodes = sorted(members, key=order.__getitem__)
        region.exits.sort(key=order.__getitem__)
        region.refusal = _check(region, dependence, members)
        claimed |= members
        regions.append(region)
    return regions


def _check(region: Region, dependence: dict[fx.Node, Dependence], members: set[fx.Node]) -> str | None:
    if not region.exits:
        return "the Fourier-domain values never come back to a real tensor with the batch in front"
    for node in region.nodes:
        name = op_name(node)
        if node.op not in ("call_function", "call_method") or name not in LINEAR_OPS:
            return f"'{node.name}' ({name}) is not a linear op of the Fourier-domain values"
        carried = [a for a in nodes_in((node.args, node.kwargs)) if dependence.get(a) == Dependence.INPUT]
        outside = [a for a in carried if a not in members and a is not region.source]
        if outside:
            return f"'{node.name}' combines the Fourier-domain values with '{outside[0].name}', computed outside"
        if name in _PRODUCTS and len(carried) > 1:
            return f"'{node.name}' ({name}) multiplies two input-dependent values"
        if (name in _STRUCTURAL or name in FFT_NAMES) and any(a not in nodes_in(node.args[:1]) for a in carried):
            # an index, a size or a shift computed from the input would make the map nonlinear
            return f"'{node.name}' ({name}) takes an input-dependent value other than the one it rearranges"
        if name in ("div", "__truediv__", "truediv", "divide", "true_divide") and (
                len(node.args) < 2 or node.args[1] in carried):
            return f"'{node.name}' divides by an input-dependent value"
    return None


class RegionMap(LinearOperator):
    """The linear part ``x -> R(x) - R(0)`` of a region's map from its source to one exit.

    Runs the region's nodes in chunks of the recorded example batch (their sizes were fixed by
    that run); the adjoint is the vector-Jacobian product of that linear map. Bounded by
    materialising it (exact), up to :data:`REGION_LIMIT` entries each way.
    """

    def __init__(self, region: Region, exit_node: fx.Node, constants: dict[fx.Node, Any], in_shape: Shape,
                 out_shape: Shape, batch: int, dtype: torch.dtype = torch.float32) -> None:
        self.region, self.exit, self.constants = region, exit_node, constants
        self.in_shape, self.out_shape, self.batch, self.dtype = tuple(in_shape), tuple(out_shape), batch, dtype

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[fx.Node, Any] = dict(self.constants)
        env[self.region.source] = x
        for node in self.region.nodes:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                env[node] = node.target(*args, **kwargs)
            if node is self.exit:
                return env[node]
        raise RuntimeError(f"region exit '{self.exit.name}' was not reached")

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        n, b = x.shape[0], self.batch
        padded = torch.cat([x, x.new_zeros(-n % b, *x.shape[1:])]) if n % b else x
        zero = self._run(x.new_zeros(b, *x.shape[1:]))
        outs = [self._run(chunk) - zero for chunk in padded.split(b)]
        return torch.cat(outs)[:n]

    def apply(self, x):
        return self._map(x.to(self.dtype)).to(x.dtype)

    def adjoint(self, y):
        with torch.enable_grad():
            x = torch.zeros(y.shape[0], *self.in_shape, dtype=self.dtype, device=y.device, requires_grad=True)
            (grad,) = torch.autograd.grad(self._map(x), x, y.to(self.dtype))
        return grad.to(y.dtype)

    def upper_bound(self):
        return materialized_bound(self)  # a region has no structure to bound it by: its exact norm

    def to(self, dtype):
        copy = RegionMap(self.region, self.exit, self.constants, self.in_shape, self.out_shape, self.batch, self.dtype)
        if dtype == torch.float64:
            copy.dtype = torch.float64
            copy.constants = {k: v.to(torch.complex128 if v.is_complex() else torch.float64)
                              if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) else v
                              for k, v in self.constants.items()}
        return copy

    def describe(self):
        return f"Fourier-domain region {self.region.nodes[0].name}..{self.exit.name}"

    @property
    def too_large(self) -> bool:
        return max(math.prod(self.in_shape), math.prod(self.out_shape)) > REGION_LIMIT
