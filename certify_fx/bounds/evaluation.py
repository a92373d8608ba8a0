"""Evaluation: the abstract interpreter that runs the rules over a captured, analysed graph.

Input-dependent tensors are represented as sums of linear operators applied to earlier "sources"
(the input, or the output of a nonlinearity). Linear stretches are folded (:mod:`.operators`) and
only bounded where a nonlinearity or the output consumes them:

* at a nonlinearity ``v = act(u)``: ``K(v) = c_act * sum_s ||A_us|| K(s)``;
* at the output ``f = sum_s A_s(s)``: ``K[i, j] = sum_s ||(e_i - e_j)^T A_s|| K(s)``, exact from the
  Gram matrix of the last dense layer when ``A_s`` ends in one.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..errors import CertifyFxError, UnsupportedNodeError
from . import registry
from .analysis import EXAMPLE_BATCH, RECORDED_LEVELS, Recording
from .capture import describe_node, node_error
from .dependence import Dependence, nodes_in
from .operators import Identity, LinearOperator, compose, materialize
from .residual import STRUCTURE_TOLERANCE, gated_residual_bound
from .spectral import REGION_LIMIT, Region, RegionMap
from .result import FULL_PRECISION
from .values import Lipschitz, NodeBound, Refused, Shape, Tracked, find_refused, has_tracked

__all__ = ["Evaluator"]

_CALLS = ("call_function", "call_method", "call_module")
#: the largest side of a gated residual layer the compiler materialises to certify it (:mod:`.residual`)
_GATED_LIMIT = 2048
#: what a node inside a Fourier-domain region evaluates to (the region is bounded at its exit)
_IN_REGION = object()


def _float(value: Any) -> float:
    return float(value.detach().max()) if isinstance(value, torch.Tensor) else float(value)


def _may_be_gated(b_op: LinearOperator, c_op: LinearOperator) -> bool:
    """A cheap necessary condition for ``B = -C^T S`` with ``S >= 0`` diagonal, before
    materialising (ResNet blocks fail it at once): then ``B^T u = -S C u``, so the ratio
    ``-(B^T u)_j / (C u)_j`` is the same ``s_j >= 0`` for two random ``u``."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, *b_op.out_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        bt_u = b_op.to(torch.float64).adjoint(u).reshape(2, -1)
        c_u = c_op.to(torch.float64).apply(u.reshape(2, *c_op.in_shape)).reshape(2, -1)
    if bt_u.shape != c_u.shape:
        return False
    scale = c_u.abs().max().clamp_min(1e-300)
    # a prefilter only (gated_residual_bound checks the structure and bounds what is left): loose
    # enough for weights folded in float32, whose rounding a small (C u)_j amplifies
    usable = (c_u.abs() > 1e-3 * scale).all(0)
    ratios = -bt_u[:, usable] / c_u[:, usable]
    tol = 1e-4 * (1 + ratios.abs().max()) if ratios.numel() else 0.0
    return bool((ratios >= -tol).all() and ((ratios[0] - ratios[1]).abs() <= tol).all())


class Evaluator(fx.Interpreter):
    """Abstract interpreter computing Lipschitz bounds; the rules (:mod:`.rules`) extend it.

    It is the :class:`~.registry.RuleContext` every rule receives as ``ev``.

    Args:
        gm: the traced model.
        recording: shapes, dtypes, shape-only values and dependence from an example run.
        norm: computes (bound, estimate) of a linear operator; keyed for persisted iterates.
        margin: computes the output's margin constants.
        logits: whether the output must be (batch, classes) logits.
    """

    def __init__(self, gm: fx.GraphModule, recording: Recording, norm: Callable[[LinearOperator, str], Lipschitz],
                 margin: Callable[[LinearOperator, str], tuple] | None, logits: bool = True,
                 on_node: Callable[[fx.Node], None] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.on_node = on_node  # told after each node (progress displays)
        self.extra_traceback = False  # our errors already name the node
        self.recording = recording
        self.shapes = recording.shapes
        self._norm, self._margin = norm, margin
        self.lipschitz: dict[str, Lipschitz] = {}
        self.shared: dict[Any, Any] = {}  # what rules share between the nodes of this evaluation
        self.rows: list[NodeBound] = []
        self.node: fx.Node | None = None
        self.rule: registry.Rule | None = None  # the current node's own rule
        self.output_margin: tuple | None = None
        self.logits = logits
        param = next(iter(gm.parameters()), None)
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()
        self._first_placeholder = True
        self._gates: dict[str, dict[str, LinearOperator]] = {}  # monotone activations: their input's form
        self._regions = {node: region for region in recording.regions for node in region.nodes}
        self._unattributed = 0.0  # seconds of the nodes since the last row (see NodeBound.seconds)

    # -- the API rules use -----------------------------------------------------------------
    def shape(self, node: fx.Node | None = None, part: int | None = None) -> Shape:
        """Output shape of ``node`` (default: the current node), without the batch dim; ``part`` picks
        one tensor of a tuple-valued result."""
        node = node or self.node
        key = node.name if part is None else f"{node.name}.{part}"
        if key not in self.shapes:
            self.fail("the operation does not return a tensor" + ("" if part is None else f" at position {part}"))
        return self.shapes[key][1:]

    def fail(self, reason: str, fix: str | None = None, error: type[UnsupportedNodeError] = UnsupportedNodeError):
        """Refuse the current node: raises ``error`` naming the node, its op, ``reason`` and ``fix``."""
        raise node_error(self.module, self.node, reason, fix, error)

    def linear(self, value: Tracked, op: LinearOperator) -> Tracked:
        """Apply a linear operator (built for ``value.shape``) to a tracked value."""
        if not isinstance(value, Tracked):
            self.fail(f"expected an input-dependent tensor, got {type(value).__name__}")
        if tuple(op.in_shape) != tuple(value.shape):
            self.fail(f"operator for shape {op.in_shape} applied to a value of shape {value.shape}")
        return Tracked(op.out_shape, {s: compose(op, a) for s, a in value.form.items()})

    def nonlinear(self, value: Tracked, constant: float | Lipschitz, what: str | None = None,
                  part: int | None = None, whole_map: bool = False, shape: Shape | None = None,
                  monotone: bool = False) -> Tracked:
        """A map with Lipschitz constant ``constant``: the result (the node's output, or its tuple
        element ``part``) becomes a new source. ``constant`` is a number (exact), or a
        :class:`Lipschitz` derived from :meth:`operator_norm` (proven bound and estimate).

        A result with more values than ``value`` is refused (an elementwise constant does not
        cover copies of an input element; copy linearly first, e.g. with ``broadcast``) unless the
        rule's ``constant`` bounds the ``whole_map`` from ``value`` to the result, copies and
        embeddings included (overlapping or padded max-pooling, SOC's channel padding). ``shape``
        gives the result another shape than the node's (an intermediate value the rule then maps
        linearly, e.g. the sorted pair behind ``max(a, b)`` and ``min(a, b)``). ``monotone`` says
        the map is elementwise and nondecreasing with slopes in ``[0, constant]`` (ReLU, tanh):
        with ``constant <= 1`` it may gate a residual layer :mod:`.residual` certifies."""
        if not isinstance(value, Tracked):
            self.fail(f"expected an input-dependent tensor, got {type(value).__name__}")
        if not isinstance(constant, Lipschitz):
            exact = float(constant)
            if not math.isfinite(exact) or exact < 0:
                self.fail(f"the Lipschitz constant {exact} is not a finite number >= 0")
            constant = Lipschitz(exact, exact, True, "exact")
        node = self.node
        shape = tuple(shape) if shape is not None else self.shape(part=part)
        if math.prod(shape) > math.prod(value.shape) and not whole_map:  # fail closed: copy linearly first
            self.fail(f"the result ({math.prod(shape)} values per example) is larger than the input it is a "
                      f"nonlinear function of ({math.prod(value.shape)}): copies of an input element are not covered "
                      "by an elementwise constant")
        inner = self.lipschitz_of(value, value.origin or f"{node.name}.in")
        source = node.name
        while source in self.lipschitz:
            source += "'"
        lip = Lipschitz(constant.bound * inner.bound, constant.estimate * inner.estimate, constant.sound and inner.sound)
        self.lipschitz[source] = lip
        if monotone and constant.sound and constant.bound <= 1 and tuple(shape) == tuple(value.shape):
            self._gates[source] = value.form
        self.rows.append(NodeBound(node.name, what or describe_node(node, self.module), "activation", constant.bound,
                                   _float(constant.estimate), lip.bound, _float(lip.estimate), constant.method,
                                   lip.sound))
        return Tracked(shape, {source: Identity(shape)}, origin=source)

    def graph_argument(self, name: str) -> Any:
        """The graph argument (a node, or a constant) the current node passes as its rule's
        parameter ``name`` (None if the call leaves it out)."""
        fixed = (None, None) if self.rule.is_module else (None,)
        return self.rule.signature.bind(*fixed, *self.node.args, **self.node.kwargs).arguments.get(name)

    def value_key(self, arg: Any) -> Any:
        """A key that two arguments share exactly when they are computed by the same ops from the
        same inputs, parameters and constants (value numbering over the graph). The forward is a
        pure function (checked before bounding), so equal keys mean equal values."""
        if isinstance(arg, fx.Node):
            keys = self.shared.setdefault("value keys", {})
            if arg not in keys:
                # numbered, so that a key stays small however deep the graph (weights computed by a
                # loop of products would otherwise nest keys exponentially)
                numbers = self.shared.setdefault("value numbers", {})
                if arg.op in ("placeholder", "get_attr"):
                    computation = (arg.op, arg.target)
                else:
                    computation = (arg.op, arg.target, self.value_key(arg.args), self.value_key(arg.kwargs))
                keys[arg] = ("value", numbers.setdefault(computation, len(numbers)))
            return keys[arg]
        if isinstance(arg, (tuple, list)):
            return (type(arg).__name__, *(self.value_key(a) for a in arg))
        if isinstance(arg, dict):
            return ("dict", *sorted((k, self.value_key(v)) for k, v in arg.items()))
        if isinstance(arg, slice):
            return ("slice", self.value_key(arg.start), self.value_key(arg.stop), self.value_key(arg.step))
        if isinstance(arg, torch.Tensor):
            return ("tensor", id(arg))  # a constant the graph holds: the same object is the same value
        return (type(arg).__name__, arg)

    def operator_norm(self, op: LinearOperator) -> Lipschitz:
        """The norm of ``op`` as the compiler bounds every linear map: proven (materialised when
        small, else the operator's sound bound) with an estimate, or a power-iteration estimate
        with persisted iterates while training."""
        return self._norm(op, f"{self.node.name}:operator")

    def apply_module(self, module: nn.Module, value: Tracked) -> Tracked:
        """Apply ``module``'s rule to ``value`` (for modules nested in a leaf, e.g. timm's BatchNormAct2d)."""
        return self.apply(self._module_rule(module), (value,), {}, module)

    def _module_rule(self, module: nn.Module) -> registry.Rule:
        rule = registry.module_rule(module)
        base = registry.registered_base(module)
        if rule is None and base is not None:
            self.fail(f"{type(module).__qualname__} changes a method of {base.__qualname__} (in its class or on the "
                      f"instance), so the rule for {base.__qualname__} does not cover it",
                      "keep the module's methods as they are, or register a rule for it with "
                      "certify_fx.bounds.register_module_rule")
        if rule is None:
            self.fail(f"no Lipschitz rule for module type {type(module).__module__}.{type(module).__name__}",
                      "replace the module, or register a rule with certify_fx.bounds.register_module_rule")
        return rule

    def apply(self, rule: registry.Rule, args: tuple, kwargs: dict, module: nn.Module | None = None) -> Any:
        """Bind the call's arguments to the rule's signature, check which may carry the input, run it."""
        fixed = (self, module) if rule.is_module else (self,)
        try:
            bound = rule.signature.bind(*fixed, *args, **kwargs)
        except TypeError as exc:
            self.fail(f"the call's arguments do not match what rule {rule.name} accounts for ({exc})",
                      "pass only the documented arguments of this op, or register a rule that handles them")
        for name, value in list(bound.arguments.items())[len(fixed):]:
            if name in rule.patterns:  # the rule reads the graph node behind it, never the value
                continue
            refused = find_refused(value)
            if refused is not None:
                self.fail(refused.reason, refused.fix)
            if name not in rule.inputs and name not in rule.shape_only and has_tracked(value):
                allowed = ", ".join(f"'{i}'" for i in sorted(rule.inputs)) or "none"
                self.fail(f"argument '{name}' depends on the input, but rule {rule.name} bounds only {allowed}",
                          "make that argument a constant, or rewrite the op")
        return rule.fn(*bound.args, **bound.kwargs)

    def _check_batch_arguments(self, n: fx.Node, rule: registry.Rule) -> None:
        """Refuse a value derived from the batch size (``x.shape[0]``, ``arange(batch)``) anywhere but
        in the sizes of a reshape or expand: one input's certificate cannot depend on its batch."""
        fixed = (None, None) if rule.is_module else (None,)
        try:
            bound = rule.signature.bind(*fixed, *n.args, **n.kwargs)
        except TypeError:
            return  # apply() refuses the call with the reason
        for name, value in list(bound.arguments.items())[len(fixed):]:
            if name in rule.sizes or name in rule.shape_only:
                continue
            for arg in nodes_in(value):
                if self.recording.dependence.get(arg) == Dependence.BATCH:
                    self.fail(f"argument '{name}' depends on the batch size (through node '{arg.name}'), so one "
                              "input's output would change with the size or order of its batch",
                              "use the batch size (x.shape[0]) only to size a reshape, an expand or a new tensor "
                              "of constant rows")

    def lipschitz_of(self, value: Tracked, name: str) -> Lipschitz:
        """Bound and estimate of the Lipschitz constant of ``value`` w.r.t. the input (cached on it)."""
        if value.lipschitz is not None:
            return value.lipschitz
        total = Lipschitz(0.0, 0.0, True)
        factors: list[Lipschitz] = []
        methods, descriptions = set(), []
        for source, op in value.form.items():
            lip = self.lipschitz[source]
            if isinstance(op, Identity):
                total = Lipschitz(total.bound + lip.bound, total.estimate + lip.estimate, total.sound and lip.sound)
                continue
            norm = self._norm(op, f"{name}<-{source}")
            total = Lipschitz(total.bound + norm.bound * lip.bound, total.estimate + norm.estimate * lip.estimate,
                              total.sound and norm.sound and lip.sound)
            factors.append(norm)
            methods.add(norm.method)
            descriptions.append(op.describe())
        if factors:
            single = len(value.form) == 1
            self.rows.append(NodeBound(
                name, "; ".join(descriptions), "linear",
                factors[0].bound if single else math.nan,
                _float(factors[0].estimate) if single else math.nan,
                total.bound, _float(total.estimate), "+".join(sorted(m for m in methods if m)) or "exact", total.sound,
            ))
        value.lipschitz = total
        return total

    def _gated_residual(self, value: Tracked) -> Tracked:
        """``value`` as one new source when it is a gated residual layer ``A u + B sigma(C u + b)``
        that :mod:`.residual` proves 1-Lipschitz-like (SLL, CPL): its form has two sources, the
        input ``u`` and a monotone activation of ``u`` alone, small enough to materialise, with the
        structure present (else ``value`` as it is, bounded generically where it is consumed)."""
        if len(value.form) != 2:
            return value
        for gate, b_op in value.form.items():
            inner = self._gates.get(gate)
            if inner is None or len(inner) != 1:
                continue
            (source, c_op), = inner.items()
            a_op = value.form.get(source)
            if a_op is None or source == gate:
                continue
            n, h = math.prod(a_op.in_shape), math.prod(b_op.in_shape)
            if math.prod(a_op.out_shape) != n or max(n, h) > _GATED_LIMIT or not _may_be_gated(b_op, c_op):
                continue
            result = gated_residual_bound(materialize(a_op), materialize(b_op), materialize(c_op))
            if result is None or result[1] > STRUCTURE_TOLERANCE:
                continue
            constant, _ = result
            inner_lip = self.lipschitz[source]
            lip = Lipschitz(constant * inner_lip.bound, constant * inner_lip.estimate, inner_lip.sound)
            name = self.node.name
            while name in self.lipschitz:
                name += "'"
            self.lipschitz[name] = lip
            self.rows.append(NodeBound(name, f"gated residual layer ({source} + {b_op.describe()} . {gate})",
                                       "activation", constant, constant, lip.bound, _float(lip.estimate),
                                       "gated residual (proven)", lip.sound))
            return Tracked(value.shape, {name: Identity(value.shape)}, origin=name)
        return value

    # -- interpreter -----------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        start, first_row = time.perf_counter(), len(self.rows)
        result = self._run_node(n)
        self._unattributed += time.perf_counter() - start
        new = range(first_row, len(self.rows))
        if new:  # the time goes to the row that proved a norm (linear or output), else the first
            at = next((i for i in new if self.rows[i].kind in ("linear", "output")), new[0])
            self.rows[at] = replace(self.rows[at], seconds=self.rows[at].seconds + self._unattributed)
            self._unattributed = 0.0
        if self.on_node is not None:
            self.on_node(n)
        return result

    def _run_node(self, n: fx.Node) -> Any:
        self.node = n
        try:
            if n.op in _CALLS:
                level = self.recording.dependence[n]
                if level in RECORDED_LEVELS:
                    return self.recording.values[n.name]
                if level == Dependence.INPUT:
                    return self._input_dependent(n)
            return super().run_node(n)
        except CertifyFxError:
            raise
        except Exception as exc:  # a rule's own failure: refuse the node, never a raw traceback
            raise node_error(self.module, n, f"could not be bounded ({type(exc).__name__}: {exc})",
                              "rewrite the operation with supported ones") from exc

    def _input_dependent(self, n: fx.Node) -> Any:
        if not n.users:
            return None  # dead code: nothing reads it (side effects were checked before)
        if n in self._regions:
            return self._region_value(n, self._regions[n])
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_module":
            module = self.fetch_attr(n.target)
            rule = self._module_rule(module)
        else:
            module = None
            rule = registry.lookup(n.op, n.target)
            if rule is None:
                self.fail("no Lipschitz rule for this operation",
                          "rewrite it with supported ops, or register one with certify_fx.bounds.register_rule")
        self._check_batch_arguments(n, rule)
        self.rule = rule
        result = self.apply(rule, args, kwargs, module)
        self._check_result(n, result)
        return self._gated_residual(result) if isinstance(result, Tracked) and self._gates else result

    def _region_value(self, n: fx.Node, region: Region) -> Any:
        """Inside a Fourier-domain region, a marker; at its exit, the region's linear map applied to
        its source (:mod:`.spectral`)."""
        if region.refusal is not None:
            self.fail(f"a Fourier transform of an input-dependent tensor starts a stretch the compiler cannot read "
                      f"as one linear map: {region.refusal}",
                      "keep only linear ops (permutes, reshapes, products with constants) between the FFT and the "
                      "inverse FFT, or apply the layer as a convolution with the equivalent kernel")
        if n not in region.exits:
            return _IN_REGION
        source = self.env[region.source]
        constants = {a: self.env[a] for node in region.nodes for a in nodes_in((node.args, node.kwargs))
                     if a not in self._regions and a is not region.source}
        op = RegionMap(region, n, constants, source.shape, self.shape(), EXAMPLE_BATCH, self.dtype)
        if op.too_large:
            self.fail(f"the Fourier-domain region has {max(math.prod(op.in_shape), math.prod(op.out_shape))} "
                      f"entries per example; the compiler materialises regions of at most {REGION_LIMIT}",
                      "certify at a smaller input size")
        result = self.linear(source, op)
        self._check_result(n, result)
        return result

    def _check_dtype(self, key: str) -> None:
        dtype = self.recording.dtypes.get(key)
        if dtype is not None and dtype not in FULL_PRECISION:
            self.fail(f"the result is {dtype}; the bound holds for float32/float64 arithmetic only (rounding to "
                      "lower precision or integers is not Lipschitz)",
                      "remove the cast, or run the model in float32 (model.float())")

    def _check_result(self, n: fx.Node, result: Any) -> None:
        if n.name in self.recording.batch_dependent:
            self.fail("one input's values depend on the batch size or on its position in the batch (they differ "
                      "between a batch of 2 and a batch of 3 holding the same inputs in another order)",
                      "compute each example from its own row; use the batch size (x.shape[0]) only to size a "
                      "reshape, an expand or a new tensor")
        if isinstance(result, Tracked):
            self._check_dtype(n.name)
            recorded = self.shapes.get(n.name)
            if recorded is None:
                self.fail("the rule returned a tensor where the operation does not")
            if recorded[0] != EXAMPLE_BATCH:
                self.fail("the operation mixes the batch dimension with other dimensions")
            if tuple(result.shape) != tuple(recorded[1:]):
                self.fail(f"the rule's result has shape {result.shape}, the operation's {recorded[1:]}")
            if result.origin is None:
                result.origin = n.name
        elif isinstance(result, (tuple, list)):
            for i, part in enumerate(result):
                if isinstance(part, Tracked):
                    self._check_dtype(f"{n.name}.{i}")
                if isinstance(part, Tracked) and tuple(part.shape) != self.shape(part=i):
                    self.fail(f"the rule's result {i} has shape {part.shape}, the operation's {self.shape(part=i)}")
        elif not isinstance(result, Refused):
            self.fail(f"the operation returns a {type(result).__name__} that depends on the input's values")

    def placeholder(self, target, args, kwargs):
        if not self._first_placeholder:  # only the first placeholder is the certified input
            if args:
                return args[0]
            self.fail("models with more than one tensor input are not supported")
        self._first_placeholder = False
        shape = self.shape()
        node = self.node
        self.lipschitz[node.name] = Lipschitz(1.0, 1.0, True)
        self.rows.append(NodeBound(node.name, f"input {shape}", "input", 1.0, 1.0, 1.0, 1.0, "exact", True))
        return Tracked(shape, {node.name: Identity(shape)}, origin=node.name)

    def output(self, target, args, kwargs):
        (result,) = args
        if isinstance(result, Refused):
            self.fail(result.reason, result.fix)
        if not isinstance(result, Tracked):
            what = "a constant" if not has_tracked(result) else f"a {type(result).__name__}"
            self.fail(f"the model returns {what}; certification needs one tensor of logits that depends on the input")
        if not self.logits:
            return result
        if len(result.shape) != 1:
            self.fail(f"expected logits of shape (batch, classes), got (batch, {', '.join(map(str, result.shape))})")
        self.output_margin = self._margin_of(result)
        return result

    def _margin_of(self, logits: Tracked) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
        m = logits.shape[0]
        bound = torch.zeros(m, m, dtype=torch.float64)
        estimate = None
        penultimate, sound = 0.0, True
        for source, op in logits.form.items():
            lip = self.lipschitz[source]
            gram_bound, gram_est, rest, rest_name = self._margin(op, f"output<-{source}")
            bound = bound + gram_bound * rest.bound * lip.bound
            term = gram_est * rest.estimate * lip.estimate
            estimate = term if estimate is None else estimate + term
            penultimate += rest.bound * lip.bound
            sound = sound and rest.sound and lip.sound
            self.rows.append(NodeBound("output", rest_name, "output", _float(rest.bound), _float(rest.estimate),
                                       _float(gram_bound) * rest.bound * lip.bound, _float(term),
                                       "gram", rest.sound and lip.sound))
        return bound, estimate, penultimate, sound
