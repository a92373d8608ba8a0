"""The rule table of the bound compiler, and the contract every rule follows.

A rule says what one operation does to a Lipschitz bound. It is registered once, at its
definition, for every form of the op (function, Tensor method, module)::

    @register_rule(torch.sub, operator.sub, "sub", inputs=("input", "other"))
    def sub(ev, input, other, *, alpha=1): ...

    @register_module_rule(nn.Softplus)
    def softplus_module(ev, module, input): ...

The contract:

* **The signature is the schema.** Each call's positional and keyword arguments are bound to the
  rule's own Python signature (``ev``, and ``module`` for module rules, first). An argument the
  signature does not name (an ``alpha``, a ``dtype``, an ``out``) cannot be bound, so the op is
  refused: a rule cannot silently ignore an argument. Rules take no ``**kwargs``.
* **Inputs are declared.** ``inputs`` lists the parameters that may carry the input. An
  input-dependent value in any other parameter (a tensor ``min`` of ``clamp``, an input-dependent
  ``bias``) is refused before the rule runs; a :class:`~.values.Refused` value anywhere is refused.
* **What a rule returns.** A :class:`~.values.Tracked` (``ev.linear`` for linear maps,
  ``ev.nonlinear`` for maps with a global Lipschitz constant; a constant that depends on an
  operator's norm is derived from ``ev.operator_norm(op)``, never computed by the rule itself), or a
  :class:`~.values.TupleResult` of them and of :class:`~.values.Refused` parts. A rule refuses with
  ``ev.fail(reason, fix)``; it must check every parameter it names (ranges, modes, dims: anything
  over the batch dimension is refused).
* **Shape-only arguments.** ``shape_only`` lists parameters the op reads only for their shape,
  dtype or device (``view_as(other)``, ``.to(other)``); they may carry the input.
* **Sizes.** ``sizes`` lists parameters read as sizes of the result (``view(batch, -1)``,
  ``expand(batch, ...)``): they alone may carry a value derived from the batch size; the rule
  works from the recorded output shape, which the example runs check at two batch sizes.
* **Leaves.** A module rule covers its type, which is a leaf for the tracer
  (:mod:`.capture`), and subclasses that only construct; a subclass that defines a method
  or property is traced into. A rule for a container (a block that
  holds convs) applies its parts' rules through ``ev.apply_module``, or checks every attribute of
  the parts that changes their map and refuses what it does not recognise.
* **Kinds.** ``kind`` says what the op is to the transforms (:data:`KINDS`): a rule registered
  with ``kind="activation"`` is replaced by ``convert``'s activation pass, with no other edit.
* **Aliasing.** ``may_alias=True`` marks ops whose output may share storage with an input (views,
  identities), which the in-place check (:mod:`.dependence`) follows.

In-place forms (``relu_``, ``x += y``, ``ReLU(inplace=True)``) use the functional rule once
:func:`~.dependence.check_mutations` has proved that nothing reads the overwritten tensor.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx
from torch import nn

from .operators import LinearOperator
from .values import Lipschitz, Shape, Tracked

__all__ = [
    "RuleContext", "Rule", "register_rule", "register_module_rule", "register_function_rule", "lookup", "lookup_node",
    "module_rule", "registered_base", "node_kind", "KINDS",
    "all_rules", "FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES",
]


class RuleContext(Protocol):
    """What a rule's first argument ``ev`` offers (the compiler's evaluator implements it)."""

    node: fx.Node  #: the node being bounded
    dtype: torch.dtype  #: the model's parameter dtype (for constants a rule builds)
    shared: dict  #: what rules share between nodes of one evaluation (the sorted pair of max/min)

    def shape(self, node: fx.Node | None = None, part: int | None = None) -> Shape:
        """The node's output shape without the batch dim (``part``: one tensor of a tuple result)."""

    def fail(self, reason: str, fix: str | None = None, error: type | None = None) -> None:
        """Refuse the node: raises an error naming the node, its op, ``reason`` and ``fix``."""

    def linear(self, value: Tracked, op: LinearOperator) -> Tracked:
        """``op`` applied to ``value`` (folded with what came before)."""

    def nonlinear(self, value: Tracked, constant: float | Lipschitz, what: str | None = None,
                  part: int | None = None, whole_map: bool = False, shape: Shape | None = None,
                  monotone: bool = False) -> Tracked:
        """A map with global Lipschitz constant ``constant`` (a number, or a :class:`Lipschitz`
        derived from :meth:`operator_norm`) applied to ``value``; its result has the node's shape
        (or ``shape``, for an intermediate value the rule then maps linearly); ``monotone``: the map
        is elementwise and nondecreasing with slopes in ``[0, constant]``."""

    def operator_norm(self, op: LinearOperator) -> Lipschitz:
        """The norm of a linear operator, proven (or estimated while training) as the compiler
        bounds every linear map."""

    def graph_argument(self, name: str) -> Any:
        """The graph node (or constant) the current node passes as the rule's parameter ``name``."""

    def value_key(self, arg: Any) -> Any:
        """Equal for two node arguments exactly when they compute the same value the same way."""

    def apply_module(self, module: nn.Module, value: Tracked) -> Tracked:
        """``module``'s own rule applied to ``value`` (modules nested in a leaf)."""


@dataclass(frozen=True, eq=False)
class Rule:
    """One registered rule: the function, the ops it serves and the parameters that may carry the input."""

    fn: Callable[..., Any]
    inputs: frozenset[str]
    is_module: bool
    may_alias: bool
    signature: inspect.Signature
    shape_only: frozenset[str] = frozenset()
    sizes: frozenset[str] = frozenset()
    kind: str | None = None
    patterns: frozenset[str] = frozenset()

    def shape_only_positions(self) -> frozenset:
        """Positions and keywords of the call whose input dependence is through their shape only."""
        params = list(self.signature.parameters.values())[2 if self.is_module else 1:]
        found: set = set()
        for i, p in enumerate(params):
            if p.name in self.shape_only:
                found.add(p.name)
                found.update(range(i, i + 64) if p.kind is p.VAR_POSITIONAL else (i,))
        return frozenset(found)

    @property
    def name(self) -> str:
        return f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"


#: what an op is to the transforms, beyond its bound:
#:
#: - ``"activation"``: an elementwise nonlinearity that ``convert`` replaces by MinMax/GroupSort
#:   (ReLU, GELU, SiLU, ...; the sorting activations it puts in their place have no kind);
#: - ``"linear"``: an affine map of its one input (convolutions, dense layers, per-channel scales,
#:   zero padding, average pooling): the folding passes compose it with its neighbours, and
#:   ``rescale_layers`` normalises its ``weight`` if it has one;
#: - ``"normalization"``: normalisation by statistics (BatchNorm, LayerNorm, GroupNorm, ...), which
#:   ``remove_normalization`` turns into a per-channel Affine where it knows how.
KINDS = frozenset({"activation", "linear", "normalization"})

FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}
MODULE_RULES: dict[type, Rule] = {}

#: operator forms that write into their first argument, and the functional op they compute.
INPLACE_OPERATORS: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.imatmul: operator.matmul,
}


def _make(fn: Callable, inputs: tuple[str, ...], is_module: bool, may_alias: bool,
          shape_only: tuple[str, ...] = (), sizes: tuple[str, ...] = (), kind: str | None = None,
          patterns: tuple[str, ...] = ()) -> Rule:
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    fixed = 2 if is_module else 1
    if any(p.kind is p.VAR_KEYWORD for p in params):
        raise TypeError(f"rule {fn.__name__} takes **kwargs; name every argument it accounts for")
    names = {p.name for p in params[fixed:]}
    missing = (set(inputs) | set(shape_only) | set(sizes) | set(patterns)) - names
    if missing:
        raise TypeError(f"rule {fn.__name__} declares inputs {sorted(missing)} that are not parameters")
    if kind is not None and kind not in KINDS:
        raise TypeError(f"rule {fn.__name__}: kind {kind!r} is not one of {sorted(KINDS)}")
    return Rule(fn, frozenset(inputs), is_module, may_alias, signature, frozenset(shape_only), frozenset(sizes),
                kind, frozenset(patterns))


def register_rule(*targets: Any, inputs: tuple[str, ...] = ("input",), may_alias: bool = False,
                  shape_only: tuple[str, ...] = (), sizes: tuple[str, ...] = (), kind: str | None = None,
                  patterns: tuple[str, ...] = ()):
    """Register ``rule(ev, ...)`` for functions (callables) and Tensor methods (names).

    ``shape_only`` names parameters whose shape, dtype or device alone the op reads
    (``view_as(other)``): they may carry the input, and count as shape-only in the dataflow.
    ``sizes`` names parameters read as the result's sizes (``view(*shape)``): the only ones that
    may hold the batch size. ``kind`` says what the op is to the transforms (:data:`KINDS`).
    ``patterns`` names parameters whose *value* the rule never reads, only the graph node behind
    it (``where``'s condition, matched against its branches): they may hold a value no rule can
    bound (a comparison's result), and the rule must refuse whatever it does not recognise.
    """

    def deco(fn: Callable) -> Callable:
        rule = _make(fn, inputs, False, may_alias, shape_only, sizes, kind, patterns)
        for t in targets:
            (METHOD_RULES if isinstance(t, str) else FUNCTION_RULES)[t] = rule
        return fn

    return deco


#: the name of earlier releases
register_function_rule = register_rule


def register_module_rule(*types: type[nn.Module], inputs: tuple[str, ...] = ("input",), may_alias: bool = False,
                         kind: str | None = None):
    """Register ``rule(ev, module, ...)`` for modules of these types.

    A subclass that defines any method or property is not covered: it may override what the rule
    relies on (``forward``, ``_conv_forward``, a weight parameterisation), so the tracer goes into
    its ``forward`` instead, or the subclass registers a rule of its own (see :func:`module_rule`).
    ``kind`` says what the module is to the transforms (:data:`KINDS`).
    """

    def deco(fn: Callable) -> Callable:
        rule = _make(fn, inputs, True, may_alias, kind=kind)
        for t in types:
            MODULE_RULES[t] = rule
        return fn

    return deco


#: what a subclass may define and still compute its base class's map: construction and printing
_INERT = frozenset({"__init__", "extra_repr", "__module__", "__qualname__", "__doc__", "__annotations__", "__dict__",
                    "__weakref__", "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__",
                    "__annotate_func__", "__annotations_cache__"})


def _adds_behaviour(cls: type) -> bool:
    """Whether ``cls`` defines anything that can change what its instances compute: a method, a
    property or any other descriptor (plain class constants and ``__init__`` cannot; the rules
    check the attributes ``__init__`` sets)."""
    return any(name not in _INERT and not isinstance(value, (int, float, str, bool, tuple, frozenset, type(None)))
               for name, value in vars(cls).items())


def registered_base(module: nn.Module) -> type | None:
    """The nearest class of ``module``'s type that has a module rule (whether or not the rule
    covers ``module``: see :func:`module_rule`)."""
    return next((cls for cls in type(module).__mro__ if cls in MODULE_RULES), None)


def module_rule(module: nn.Module) -> Rule | None:
    """The rule registered for ``module``'s type, or for a base class when every class in between
    only constructs (a subclass that overrides ``forward``, ``_conv_forward``, a weight property or
    any other method is not covered: it is traced into, or registers its own rule). Neither is a
    module whose instance replaces a method (``module.forward = ...``)."""
    cls = type(module)
    if any(not k.startswith("__") and callable(getattr(cls, k, None)) for k in vars(module)):
        return None
    for cls in type(module).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule
        if _adds_behaviour(cls):
            return None
    return None


def lookup(kind: str, target: Any, module: nn.Module | None = None) -> Rule | None:
    """The rule for a ``call_function`` / ``call_method`` / ``call_module`` target (in-place forms included)."""
    if kind == "call_module":
        return module_rule(module)
    if kind == "call_method":
        rule = METHOD_RULES.get(target)
        if rule is None and target.endswith("_") and not target.startswith("_"):
            rule = METHOD_RULES.get(target[:-1])
        return rule
    try:
        rule = FUNCTION_RULES.get(target)
        if rule is None and target in INPLACE_OPERATORS:
            rule = FUNCTION_RULES.get(INPLACE_OPERATORS[target])
    except TypeError:  # unhashable target
        return None
    if rule is None:
        name = getattr(target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):  # relu_, F.leaky_relu_: the functional form's rule
            for namespace in (torch, torch.nn.functional):
                functional = getattr(namespace, name[:-1], None)
                rule = FUNCTION_RULES.get(functional) if functional is not None else None
                if rule is not None:
                    break
    return rule


def lookup_node(node: fx.Node, gm: fx.GraphModule) -> Rule | None:
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    return lookup(node.op, node.target, module)


def node_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The kind of ``node``'s rule (:data:`KINDS`), or None (no rule, or a rule without a kind)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    rule = lookup_node(node, gm)
    return rule.kind if rule is not None else None


def all_rules() -> list[Rule]:
    """Every registered rule, once."""
    seen: dict[int, Rule] = {}
    for table in (FUNCTION_RULES, METHOD_RULES, MODULE_RULES):
        for rule in table.values():
            seen.setdefault(id(rule), rule)
    return list(seen.values())
