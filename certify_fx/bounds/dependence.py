"""What depends on the input, and what the graph hides: the compiler's acceptance checks.

* :func:`input_dependence` is a dataflow analysis from the certified input (the first placeholder).
  A node is ``CONST`` only if no path leads to it from the input, ``SHAPE`` if the input reaches it
  only through its shape apart from the batch size, its dtype or device (``x.size(1)``,
  ``x.shape[-2:]``: fixed once the input shape is), ``BROADCAST`` for a tensor of one constant row
  repeated over the batch (``zeros_like(x)``, ``cls_token.expand(x.shape[0], -1, -1)``), ``BATCH``
  if it may depend on the batch size (``x.shape[0]``, ``arange(batch)``, ``ones(batch).sum()``), and
  ``INPUT`` otherwise. Nodes below ``INPUT`` are evaluated on the example runs; a ``BATCH`` value may
  reach an input-dependent op only as a size (the rule's ``sizes``), and every ``INPUT`` node,
  tuple-valued or not, goes through a rule or is refused.
* :func:`check_mutations` proves that an in-place op (``relu_``, ``x += y``, ``ReLU(inplace=True)``)
  mutates a tensor that nothing reads afterwards through an older handle, so treating the op as
  its functional form is exact; otherwise the op is refused.
* :func:`check_hooks` refuses forward hooks the traced graph does not contain (on the root module
  and on leaf modules; hooks of traced-through modules are part of the graph).
"""

from __future__ import annotations

import enum
import inspect
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as module_globals

from . import registry

__all__ = ["Dependence", "input_dependence", "BROADCAST_CONSTRUCTORS", "check_mutations", "check_hooks",
           "forward_hooks", "mutated_argument", "nodes_in"]


class Dependence(enum.IntEnum):
    CONST = 0  # no path from the input
    SHAPE = 1  # depends on the input's shape (batch size aside), dtype or device: fixed with input_shape
    BROADCAST = 2  # a tensor whose leading dim is the batch size, every row the same constant (zeros_like(x))
    BATCH = 3  # may depend on the batch size (x.shape[0], arange(batch), ones(batch).sum())
    INPUT = 4  # depends on the input's values


#: attributes that say nothing about the batch size (``x.shape`` does: it holds it)
SHAPE_ATTRIBUTES = frozenset({
    "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized", "is_meta",
    "is_floating_point", "requires_grad",
})

_SELF = frozenset({0, "input", "self"})
#: ops without a rule whose listed arguments are read only for their shape, dtype or device (ops
#: with a rule declare theirs with ``register_rule(shape_only=...)``), and the level of what they
#: read: the batch size (``numel``, ``size()``), nothing of it (``dim``), or a broadcast of one row.
SHAPE_ONLY_ARGUMENTS: dict[Any, tuple[frozenset, Dependence]] = {
    **{m: (_SELF, Dependence.SHAPE) for m in (
        "dim", "ndimension", "element_size", "get_device", "is_contiguous", "is_floating_point", "is_complex",
        "new_tensor")},
    **{m: (_SELF, Dependence.BATCH) for m in ("size", "numel", "nelement", "new_empty")},
    **{f: (_SELF, Dependence.BATCH) for f in (torch.numel, len, torch.empty_like)},
    **{m: (_SELF, Dependence.BROADCAST) for m in ("new_zeros", "new_ones", "new_full")},
    **{f: (_SELF, Dependence.BROADCAST) for f in (torch.zeros_like, torch.ones_like, torch.full_like)},
}
#: constructors whose sizes may hold the batch size while every row gets the same value: the
#: argument positions read as sizes (the rest must not depend on the batch size).
BROADCAST_CONSTRUCTORS: dict[Any, frozenset] = {
    torch.zeros: frozenset({"size"} | set(range(64))), torch.ones: frozenset({"size"} | set(range(64))),
    torch.full: frozenset({0, "size"}),
    "new_zeros": frozenset({"size"} | set(range(1, 64))), "new_ones": frozenset({"size"} | set(range(1, 64))),
    "new_full": frozenset({1, "size"}),
    "expand": frozenset({"size"} | set(range(1, 64))), "repeat": frozenset({"repeats"} | set(range(1, 64))),
    torch.broadcast_to: frozenset({1, "size"}), "broadcast_to": frozenset({1, "size"}),
    "expand_as": frozenset({1, "other"}),
}


_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.setitem,
}


def _argument_items(node: fx.Node):
    for i, a in enumerate(node.args):
        yield i, a
    yield from node.kwargs.items()


def nodes_in(obj: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(obj, lambda n: found.append(n) or n)
    return found


def _target_key(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _batch_index(index: Any, ndim: int | None) -> bool:
    """Whether ``shape[index]`` (or ``size(index)``) may read the batch size (dim 0)."""
    if isinstance(index, bool) or not isinstance(index, (int, slice)):
        return True
    if isinstance(index, slice):
        if index.step not in (None, 1) or not isinstance(index.start, (int, type(None))):
            return True
        start = index.start or 0
        if start < 0:
            return ndim is None or start + ndim <= 0
        return start == 0 and index.stop != 0
    if index < 0:
        return ndim is None or index + ndim == 0
    return index == 0


def _shape_read(node: fx.Node, ndims: dict[str, int]) -> tuple[frozenset, Dependence] | None:
    """For an op that reads its tensor argument's shape, dtype or device only: the positions read
    so, and what the result can depend on (``SHAPE``, ``BATCH`` or ``BROADCAST``)."""
    args = node.args
    if node.op == "call_function" and node.target is getattr and len(args) > 1:
        if args[1] in SHAPE_ATTRIBUTES:
            return _SELF, Dependence.SHAPE
        return (_SELF, Dependence.BATCH) if args[1] == "shape" else None
    if node.op == "call_method" and node.target == "size":
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
        if dim is not None and isinstance(args[0], fx.Node) and not _batch_index(dim, ndims.get(args[0].name)):
            return _SELF, Dependence.SHAPE
        return _SELF, Dependence.BATCH
    try:
        return SHAPE_ONLY_ARGUMENTS.get(_target_key(node))
    except TypeError:  # unhashable target
        return None


def _shape_tuple_source(node: fx.Node) -> fx.Node | None:
    """The tensor whose whole shape ``node`` is (``x.shape``, ``x.size()``), if it is one."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] == "shape":
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None


def input_dependence(gm: fx.GraphModule, ndims: dict[str, int] | None = None,
                     forced: dict[fx.Node, Dependence] | None = None) -> dict[fx.Node, Dependence]:
    """Classify every node by dataflow from the first placeholder (see :class:`Dependence`).

    ``ndims`` (node name -> number of dims, from an example run) resolves negative indices into a
    shape (``x.shape[-1]`` does not read the batch size); without it they count as reading it.
    ``forced`` raises the class of some nodes (a broadcast the example runs disproved), and with
    it the class of everything computed from them.
    """
    ndims, forced = ndims or {}, forced or {}
    dep: dict[fx.Node, Dependence] = {}
    first = True
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dep[node] = Dependence.INPUT if first else Dependence.CONST
            first = False
            continue
        if node.op == "get_attr":
            dep[node] = Dependence.CONST
            continue
        dep[node] = max(_level(node, gm, dep, ndims), forced.get(node, Dependence.CONST))
    return dep


def _level(node: fx.Node, gm: fx.GraphModule, dep: dict[fx.Node, Dependence], ndims: dict[str, int]) -> Dependence:
    if node.op not in ("call_function", "call_method", "call_module"):
        return max((dep[a] for a in nodes_in((node.args, node.kwargs))), default=Dependence.CONST)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        source = _shape_tuple_source(node.args[0])
        if source is not None and not _batch_index(node.args[1], ndims.get(source.name)):
            return min(dep[source], Dependence.SHAPE)  # x.shape[1], x.shape[-2:]
    read = _shape_read(node, ndims)
    if read is None:
        rule = registry.lookup_node(node, gm)
        # a rule's shape-only argument (view_as(other)) carries the other tensor's whole shape
        read = (rule.shape_only_positions(), Dependence.BATCH) if rule is not None else (frozenset(), None)
    shape_only, reads = read
    try:
        sizes = BROADCAST_CONSTRUCTORS.get(_target_key(node), frozenset())
    except TypeError:  # unhashable target
        sizes = frozenset()
    level, broadcast = Dependence.CONST, False
    for key, value in _argument_items(node):
        for arg in nodes_in(value):
            d = dep[arg]
            if key in sizes and d > Dependence.SHAPE:
                broadcast, d = True, Dependence.SHAPE  # the batch size as a size: rows stay alike
            elif key in shape_only and d > Dependence.SHAPE:
                d = reads  # what the op reads of the tensor: nothing of the batch, or the batch size
            level = max(level, d)
    # An op on BROADCAST values stays BROADCAST only while the example runs find one constant row,
    # the same at both batch sizes (compiler.record checks; a sum over the batch fails it: BATCH).
    return Dependence.BROADCAST if broadcast and level <= Dependence.SHAPE else level


# -- in-place ops ------------------------------------------------------------------------------


def _binds_inplace(target: Callable, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(target).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def mutated_argument(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The node an in-place op writes into (``None`` if it writes nothing, or into a non-node;
    ``out=`` writes are refused before, by the compiler's structure check)."""
    first = node.args[0] if node.args else None
    if node.op == "call_method":
        name = node.target
        inplace = (name.endswith("_") and not name.startswith("__")) or name in {
            "__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"}
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        inplace = (node.target in _INPLACE_OPERATORS
                   or (name.endswith("_") and not name.startswith("_")
                       and node.target in (getattr(torch, name, None), getattr(torch.nn.functional, name, None)))
                   or _binds_inplace(node.target, node.args, node.kwargs))
    elif node.op == "call_module":
        module = gm.get_submodule(node.target)
        inplace = getattr(module, "inplace", False) is True
        if first is None:
            first = next(iter(node.kwargs.values()), None)
    else:
        return None
    if not inplace:
        return None
    return first if isinstance(first, fx.Node) else None


def _may_alias(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node``'s output may share storage with one of its tensor arguments."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if mutated_argument(node, gm) is not None:
        return True  # an in-place op returns the tensor it wrote
    rule = registry.lookup_node(node, gm)
    return rule is None or rule.may_alias


def check_mutations(gm: fx.GraphModule, dep: dict[fx.Node, Dependence], shapes: dict[str, tuple],
                    fail: Callable[[fx.Node, str, str], None]) -> None:
    """Refuse every in-place op whose effect the functional reading of the graph would miss.

    An in-place op at ``n`` writing into ``a`` is accepted when it touches only values computed
    from constants (it then runs for real), or when ``a`` is an intermediate tensor (not the input,
    not a parameter or buffer) and no node after ``n`` reads ``a`` or any tensor that may share its
    storage through a handle created before ``n``. Readers of ``n``'s own result see the written
    value, exactly as the functional form gives it.
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        target = mutated_argument(node, gm)
        if target is None:
            continue
        if target.name not in shapes:
            continue  # Python numbers (shape arithmetic): no storage
        state = _state_alias(target, gm)
        involved = [node] + nodes_in((node.args, node.kwargs))
        if all(dep[n] == Dependence.CONST for n in involved) and not state:
            continue  # runs for real, with its side effect, exactly as in the model
        if state:
            fail(node, "an in-place op writes into the model's input or its parameters/buffers",
                 "use the out-of-place op (e.g. `torch.relu(x)` instead of `x.relu_()`, `inplace=False`)")
        aliases = _alias_class(target, node, gm, order)
        for alias in aliases:
            late = [u for u in alias.users if u is not node and order[u] > order[node]]
            if late:
                fail(node, f"an in-place op writes into '{target.name}', which node '{late[0].name}' reads "
                           "afterwards", "use the out-of-place op (`inplace=False`, `y = x + z` instead of `x += z`)")


def _state_alias(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may share storage with the model's input, a parameter or a buffer."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            return True
        if _may_alias(n, gm):
            stack.extend(nodes_in((n.args, n.kwargs)))
    return False


def _alias_class(target: fx.Node, at: fx.Node, gm: fx.GraphModule, order: dict) -> set[fx.Node]:
    """Nodes before ``at`` that may share storage with ``target`` (up and down may-alias edges)."""
    seen, stack = set(), [target]
    while stack:
        n = stack.pop()
        if n in seen or order[n] >= order[at]:
            continue
        seen.add(n)
        if _may_alias(n, gm):
            stack.extend(nodes_in((n.args, n.kwargs)))
        stack.extend(u for u in n.users if _may_alias(u, gm))
    return seen


# -- hooks -------------------------------------------------------------------------------------


def forward_hooks(module: nn.Module) -> list[str]:
    """The kinds of forward hooks registered on ``module`` itself (not its children)."""
    kinds = []
    if getattr(module, "_forward_hooks", None):
        kinds.append("forward hook")
    if getattr(module, "_forward_pre_hooks", None):
        kinds.append("forward pre-hook")
    return kinds


def check_hooks(model: nn.Module, gm: fx.GraphModule, fail: Callable[[fx.Node | None, str, str], None]) -> None:
    """Refuse forward hooks that tracing drops: global ones, the root module's, and leaf modules'."""

    fix = "remove the hook (handle.remove()), or fold what it does into the module's forward"
    if getattr(module_globals, "_global_forward_hooks", None) or getattr(module_globals,
                                                                          "_global_forward_pre_hooks", None):
        fail(None, "a global forward hook is registered (torch.nn.modules.module.register_module_forward_hook); "
                   "the traced graph does not run it", fix)
    for root in {id(model): model, id(gm): gm}.values():
        kinds = forward_hooks(root)
        if kinds:
            fail(None, f"the model has a {kinds[0]}, which the traced graph does not run", fix)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for path, sub in gm.get_submodule(node.target).named_modules():
                kinds = forward_hooks(sub)
                if kinds:
                    where = f"its submodule '{path}'" if path else "the module"
                    fail(node, f"{where} has a {kinds[0]}, which the graph's rule for it does not run", fix)
