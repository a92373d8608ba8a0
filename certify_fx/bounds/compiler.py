"""The bound compiler: per-margin Lipschitz constants ``K[i, j]`` from a torch.fx graph.

:func:`bound` traces the model and classifies every node by dataflow from the input
(:mod:`.dependence`): nodes that provably do not depend on the input are computed for real
(weights, normalised weights), nodes that depend only on its shape take their value from one
example run, and every input-dependent node goes through its rule (:mod:`.registry`, families in
:mod:`.rules`) or is refused. Input-dependent tensors are represented as sums of linear operators
applied to earlier "sources" (the input, or the output of a nonlinearity). Linear stretches are
folded (:mod:`.operators`) and only bounded where a nonlinearity or the output consumes them:

* at a nonlinearity ``v = act(u)``: ``K(v) = c_act * sum_s ||A_us|| K(s)``;
* at the output ``f = sum_s A_s(s)``: ``K[i, j] = sum_s ||(e_i - e_j)^T A_s|| K(s)``, exact from the
  Gram matrix of the last dense layer when ``A_s`` ends in one.

Before evaluating, the compiler refuses what the graph hides: forward hooks, in-place writes that
are read again, random operations. Any failure names the node, its op and the fix; nothing is
assumed 1-Lipschitz.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..errors import CertifyFxError, UnsupportedNodeError
from ..tracing import example_input, trace
from . import registry, rules
from .dependence import Dependence, check_hooks, check_mutations, input_dependence, nodes_in as _nodes_in
from .fingerprint import Fingerprint, model_fingerprint
from .module_state import ModuleState, unwrap_model
from .norms import SAFETY
from .operators import Compose, Dense, Identity, LinearOperator, compose, has_exact_bound, materialized_bound
from .power_iteration import power_iteration
from .values import Lipschitz, NodeBound, Refused, Shape, Tracked, find_refused, has_tracked

if TYPE_CHECKING:
    from ..progress import ProgressLike

__all__ = ["Tracked", "NodeBound", "LipschitzBound", "BoundCompiler", "bound", "Recording", "record", "linear_form"]

_EXAMPLE_BATCH = 2
_CALLS = ("call_function", "call_method", "call_module")
#: dtypes an input-dependent tensor may have: the bound assumes (at least) float32 arithmetic.
FULL_PRECISION = (torch.float32, torch.float64)


@dataclass
class LipschitzBound:
    """Margin Lipschitz constants of a classifier, with how they were obtained.

    Attributes:
        margin: (m, m) float64 tensor; ``margin[i, j]`` bounds the Lipschitz constant of ``f_i - f_j``.
        estimate: the power-iteration counterpart of ``margin`` (same formula, estimated norms).
        penultimate: bound on the Lipschitz constant of the input to the last dense layer.
        sound: True only if every factor is a proven upper bound.
        nodes: per-node breakdown.
        input_shape: the one-input shape the bound holds for.
        fingerprint: the model (structure and weights) it was proven for; certification refuses
            the bound for any other.
    """

    margin: torch.Tensor
    estimate: torch.Tensor
    penultimate: float
    sound: bool
    nodes: list[NodeBound] = field(default_factory=list)
    input_shape: Shape = ()
    fingerprint: Fingerprint | None = None

    @property
    def num_classes(self) -> int:
        return self.margin.shape[0]

    @property
    def max_margin(self) -> float:
        return float(self.margin.max())

    @property
    def finite(self) -> bool:
        """False if any constant is NaN or infinite (then nothing can be certified with it)."""
        return bool(torch.isfinite(self.margin).all())

    @property
    def tightness(self) -> float:
        """max over pairs of margin / estimate (>= 1 when sound; 1 means exact)."""
        off = ~torch.eye(self.num_classes, dtype=torch.bool)
        est = self.estimate[off]
        return float((self.margin[off] / est.clamp_min(1e-30)).max()) if est.numel() else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "sound": self.sound,
            "finite": self.finite,
            "fingerprint": str(self.fingerprint) if self.fingerprint else None,
            "penultimate": self.penultimate,
            "max_margin": self.max_margin,
            "margin": self.margin.tolist(),
            "estimate": self.estimate.tolist(),
            "nodes": [n.__dict__ for n in self.nodes],
        }


def _target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """The node's operation and, for functions, the module whose forward called it."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} ({node.target})"
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    name = f"Tensor.{node.target}" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        return f"{name} in {getattr(cls, '__name__', cls)} ({path})"
    return name


def _node_error(gm: fx.GraphModule, node: fx.Node | None, reason: str, fix: str | None = None,
                error: type[UnsupportedNodeError] = UnsupportedNodeError) -> UnsupportedNodeError:
    if node is None:
        return error("<model>", type(gm).__name__, reason, fix)
    return error(node.name, _target_name(node, gm), reason, fix)


def _float(value: Any) -> float:
    return float(value.detach().max()) if isinstance(value, torch.Tensor) else float(value)


@dataclass
class Recording:
    """One example run: per-node shapes and dtypes of tensors, values of the nodes computed from the
    input's shape alone (``SHAPE``, ``BROADCAST``, ``BATCH``), and the dependence class of every node."""

    shapes: dict[str, Shape]
    dtypes: dict[str, torch.dtype]
    values: dict[str, Any]
    dependence: dict[fx.Node, Dependence]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  #: per-row summaries of input-dependent tensors
    output: Any = None
    #: input-dependent nodes whose rows differ between the batch of 2 and the reordered batch of 3
    batch_dependent: set[str] = field(default_factory=set)


_RECORDED = (Dependence.SHAPE, Dependence.BROADCAST, Dependence.BATCH)


def _row_summary(t: torch.Tensor) -> torch.Tensor:
    """(batch, 2) float64: each row's norm and its projection on a fixed pattern; a value that
    depends on the batch size or on the row's position moves one of them."""
    flat = t.detach().reshape(t.shape[0], -1).to(torch.float64)
    pattern = torch.sin(0.7 * torch.arange(flat.shape[1], dtype=torch.float64, device=flat.device) + 0.3)
    return torch.stack([flat.norm(dim=1), flat @ pattern], 1).cpu()


class _Recorder(fx.Interpreter):
    """Runs the graph once on an example batch and records what :class:`Recording` holds."""

    def __init__(self, gm: fx.GraphModule, dependence: dict[fx.Node, Dependence], batch: int) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.dependence = dependence
        self.batch = batch
        self.recording = Recording({}, {}, {}, dependence)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _node_error(self.module, n, f"failed on an example input: {type(exc).__name__}: {exc}",
                              "check input_shape, or that the module accepts a batch of that shape") from exc
        parts = [(n.name, result)] if isinstance(result, torch.Tensor) else (
            [(f"{n.name}.{i}", p) for i, p in enumerate(result)] if isinstance(result, (tuple, list)) else [])
        level = self.dependence.get(n)
        for key, part in parts:
            if isinstance(part, torch.Tensor):
                self.recording.shapes[key] = tuple(part.shape)
                self.recording.dtypes[key] = part.dtype
                batched = part.dim() and part.shape[0] == self.batch and part.is_floating_point()
                if level == Dependence.INPUT and batched:
                    self.recording.rows[key] = _row_summary(part)
        if level in _RECORDED:
            self.recording.values[n.name] = result
        if n.op == "output":
            self.recording.output = result
        return result


def _example_batch(input_shape: tuple[int, ...], batch: int, gm: nn.Module) -> torch.Tensor:
    params = next(iter(gm.parameters()), None)
    dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
    device = params.device if params is not None else "cpu"
    return example_input(tuple(input_shape), batch, dtype, device)


def _run_example(gm: fx.GraphModule, dependence: dict[fx.Node, Dependence], x: torch.Tensor) -> Recording:
    recorder = _Recorder(gm, dependence, x.shape[0])
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        with torch.no_grad():
            recorder.run(x)
    finally:
        for buffer, value in saved:
            buffer.data = value  # by value: a run may have resized a buffer
    return recorder.recording


def _check_batch_dim(gm: fx.GraphModule, dependence: dict[fx.Node, Dependence], input_shape: tuple[int, ...]) -> None:
    """Say so when a failing ``input_shape`` works without its first entry (``(1, 3, 32, 32)``
    written as torchinfo users do, batch included)."""
    if len(input_shape) < 2 or input_shape[0] != 1:
        return
    try:
        _run_example(gm, dependence, _example_batch(input_shape[1:], _EXAMPLE_BATCH, gm))
    except Exception:
        return
    raise CertifyFxError(f"input_shape {tuple(input_shape)} seems to include a batch dimension; give one input's "
                         f"shape without batch: {tuple(input_shape[1:])}")


#: the batch of 3 holds the batch of 2's rows at these positions (and a new row at 1)
_REORDERED = {0: 2, 1: 0}


def _reordered(x: torch.Tensor) -> torch.Tensor:
    fresh = torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(1), dtype=x.dtype).to(x.device)
    return torch.stack([x[1], fresh, x[0]])


def _rows_agree(two: torch.Tensor, three: torch.Tensor, rtol: float = 1e-4) -> bool:
    for i, j in _REORDERED.items():
        a, b = two[i], three[j]
        if torch.isnan(a).any() or torch.isnan(b).any():
            if not torch.equal(torch.isnan(a), torch.isnan(b)):
                return False
            continue
        if not bool(((a - b).abs() <= rtol * max(float(a[0]), float(b[0])) + 1e-6).all()):
            return False
    return True


def _row_uniform(value: Any, batch: int) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch
            and bool((value == value[:1]).all()))


def _checked_broadcasts(gm: fx.GraphModule, ndims: dict[str, int], two: Recording,
                        three: Recording) -> dict[fx.Node, Dependence]:
    """The dependence classes once every ``BROADCAST`` value has been seen to be one constant row,
    the same at both batch sizes; one that is not counts as ``BATCH``, and so does everything
    computed from it (then refused where it would reach a value)."""
    dependence, forced = two.dependence, {}
    while True:
        failing = {node: Dependence.BATCH for node, level in dependence.items() if level == Dependence.BROADCAST
                   and not _same_row_at_both_sizes(two.values.get(node.name), three.values.get(node.name))}
        if not failing:
            return dependence
        forced.update(failing)
        dependence = input_dependence(gm, ndims, forced)


def _same_row_at_both_sizes(two: Any, three: Any) -> bool:
    return (_row_uniform(two, _EXAMPLE_BATCH) and _row_uniform(three, _EXAMPLE_BATCH + 1)
            and torch.equal(two[0], three[0]))


def _check_batch_independence(gm: fx.GraphModule, two: Recording, three: Recording) -> None:
    """Every input-dependent tensor keeps the batch in front, and one input's values do not depend
    on the batch size or on the input's position in the batch (a node whose rows differ is refused
    by the evaluator, after its rule)."""
    dependence = two.dependence
    input_nodes = {n.name: n for n, d in dependence.items() if d == Dependence.INPUT}
    for key, shape2 in two.shapes.items():  # keys are node names, or "name.i" for tuple parts
        node, shape3 = input_nodes.get(key.split(".")[0]), three.shapes.get(key)
        if node is None or not shape2 or shape2[0] != _EXAMPLE_BATCH or shape3 is None:
            continue  # a batch dim that is visibly gone is refused by the node's rule, with its reason
        if not shape3 or shape3[0] != _EXAMPLE_BATCH + 1 or shape2[1:] != shape3[1:]:
            raise _node_error(gm, node, f"the batch dimension does not stay in front (shape {shape2} for a batch "
                              f"of 2, {shape3} for a batch of 3): the operation mixes examples of a batch",
                              "keep the batch as dim 0 and use x.shape[0] for it")
        if key in two.rows and key in three.rows and not _rows_agree(two.rows[key], three.rows[key]):
            two.batch_dependent.add(node.name)  # refused after the node's rule, whose reason comes first


def record(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> Recording:
    """Run ``gm`` on an example batch of 2, and of 3 holding the same inputs in another order, to
    prove that every input-dependent tensor keeps the batch in front and that nothing of one input
    depends on the batch size or order; buffers are restored."""
    dependence = input_dependence(gm)
    x = _example_batch(input_shape, _EXAMPLE_BATCH, gm)
    try:
        recording = _run_example(gm, dependence, x)
    except UnsupportedNodeError:
        _check_batch_dim(gm, dependence, input_shape)
        raise
    # negative indices into a shape (x.shape[-1]) resolved with each tensor's number of dims
    ndims = {key: len(shape) for key, shape in recording.shapes.items()}
    recording.dependence = dependence = input_dependence(gm, ndims)
    try:
        other = _run_example(gm, dependence, _reordered(x))
    except UnsupportedNodeError as exc:
        raise UnsupportedNodeError(exc.node, exc.op, "the model fails on a batch of another size (it depends on "
                                   f"the batch size): {exc.reason}", "use the batch size from x.shape[0]") from None
    recording.dependence = other.dependence = _checked_broadcasts(gm, ndims, recording, other)
    _check_batch_independence(gm, recording, other)
    return recording


def _fail_at(gm: fx.GraphModule):
    def fail(node, reason, fix=None):
        raise _node_error(gm, node, reason, fix)

    return fail


def check_structure(model: nn.Module, gm: fx.GraphModule) -> None:
    """Refuse, before running anything, what the graph hides: hooks, random ops, ``out=`` writes."""
    fail = _fail_at(gm)
    check_hooks(model, gm, fail)
    for node in gm.graph.nodes:
        if node.kwargs.get("out") is not None:
            fail(node, "writes into an `out=` tensor", "drop `out=` and use the returned tensor")
        random = ((node.op == "call_function" and node.target in rules.refusals.RANDOM_FUNCTIONS)
                  or (node.op == "call_method" and node.target in rules.refusals.RANDOM_METHODS)
                  or (node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                              rules.refusals.RANDOM_MODULES)
                      and gm.get_submodule(node.target).training))
        if random:
            fail(node, "a random operation makes the model more than one function, so no certificate holds",
                 "remove it, or call model.eval()")


def _traced(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` and put back whatever tracing wrote into it (a forward that assigns an
    attribute leaves a ``torch.fx.Proxy`` there; fx stores tensor constants on the root)."""
    if isinstance(model, fx.GraphModule):
        return model
    state = ModuleState(model)
    try:
        return trace(model)
    finally:
        state.restore()


def _same_outputs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
        scale = float(torch.nan_to_num(a.abs(), posinf=0.0).max()) if a.numel() else 0.0
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale + 1e-7, equal_nan=True))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_outputs(p, q) for p, q in zip(a, b))
    return type(a) is type(b)


def check_pure_forward(model: nn.Module, gm: fx.GraphModule, recording: Recording, input_shape: Shape) -> None:
    """Refuse a forward that is not one function of its input: one that changes the model's state
    on every call (a counter, a buffer it writes), gives two answers on the same input (Python
    randomness), or computes something else than the traced graph (a value baked in at tracing).
    A value cached on the first call (the same on every later call) is accepted. The model is left
    exactly as it was."""
    if isinstance(model, fx.GraphModule) and model is gm:
        return
    x = _example_batch(input_shape, _EXAMPLE_BATCH, gm)
    before = ModuleState(model)
    try:
        with torch.no_grad():
            first = model(x)
            after_first = ModuleState(model)
            second = model(x)
        changed = after_first.changes()
    except Exception as exc:
        raise _node_error(gm, None, f"the model's forward fails on an example input: {type(exc).__name__}: {exc}",
                          "check input_shape") from exc
    finally:
        before.restore()
    if changed:
        raise _node_error(gm, None, f"forward changes the model's state on every call ('{changed[0]}'), so the "
                          "model is not one function of its input", "compute the value in forward without storing "
                          "it, or keep it as a parameter or buffer that forward only reads")
    if not _same_outputs(first, second):
        raise _node_error(gm, None, "two runs of the model on the same input differ (Python randomness, or state "
                          "read in forward), so no certificate holds", "make forward deterministic: no random, no "
                          "state that changes between calls")
    if not _same_outputs(first, recording.output):
        raise _node_error(gm, None, "the traced graph computes something else than the model's forward (a value "
                          "read once at tracing, such as random.random() or a Python attribute, was baked in)",
                          "compute that value with tensor ops inside forward, or make it a buffer")


def traced_and_recorded(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[fx.GraphModule, Recording]:
    """Trace ``model`` (a known wrapper is unwrapped; the model is left as it was), check its
    structure, record the example runs and check its in-place ops."""
    model = unwrap_model(model)
    gm = _traced(model)
    check_structure(model, gm)
    recording = record(gm, input_shape)
    check_mutations(gm, recording.dependence, recording.shapes, _fail_at(gm))
    return gm, recording


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
        self.rows: list[NodeBound] = []
        self.node: fx.Node | None = None
        self.output_margin: tuple | None = None
        self.logits = logits
        param = next(iter(gm.parameters()), None)
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()
        self._first_placeholder = True

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
        raise _node_error(self.module, self.node, reason, fix, error)

    def linear(self, value: Tracked, op: LinearOperator) -> Tracked:
        """Apply a linear operator (built for ``value.shape``) to a tracked value."""
        if not isinstance(value, Tracked):
            self.fail(f"expected an input-dependent tensor, got {type(value).__name__}")
        if tuple(op.in_shape) != tuple(value.shape):
            self.fail(f"operator for shape {op.in_shape} applied to a value of shape {value.shape}")
        return Tracked(op.out_shape, {s: compose(op, a) for s, a in value.form.items()})

    def nonlinear(self, value: Tracked, constant: float | Lipschitz, what: str | None = None,
                  part: int | None = None) -> Tracked:
        """A map with Lipschitz constant ``constant``: the result (the node's output, or its tuple
        element ``part``) becomes a new source. ``constant`` is a number (exact), or a
        :class:`Lipschitz` derived from :meth:`operator_norm` (proven bound and estimate)."""
        if not isinstance(value, Tracked):
            self.fail(f"expected an input-dependent tensor, got {type(value).__name__}")
        if not isinstance(constant, Lipschitz):
            exact = float(constant)
            if not math.isfinite(exact) or exact < 0:
                self.fail(f"the Lipschitz constant {exact} is not a finite number >= 0")
            constant = Lipschitz(exact, exact, True, "exact")
        node = self.node
        inner = self.lipschitz_of(value, value.origin or f"{node.name}.in")
        source = node.name
        while source in self.lipschitz:
            source += "'"
        lip = Lipschitz(constant.bound * inner.bound, constant.estimate * inner.estimate, constant.sound and inner.sound)
        self.lipschitz[source] = lip
        self.rows.append(NodeBound(node.name, what or _target_name(node, self.module), "activation", constant.bound,
                                   _float(constant.estimate), lip.bound, _float(lip.estimate), constant.method,
                                   lip.sound))
        shape = self.shape(part=part)
        return Tracked(shape, {source: Identity(shape)}, origin=source)

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
            for arg in _nodes_in(value):
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

    # -- interpreter -----------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        result = self._run_node(n)
        if self.on_node is not None:
            self.on_node(n)
        return result

    def _run_node(self, n: fx.Node) -> Any:
        self.node = n
        try:
            if n.op in _CALLS:
                level = self.recording.dependence[n]
                if level in _RECORDED:
                    return self.recording.values[n.name]
                if level == Dependence.INPUT:
                    return self._input_dependent(n)
            return super().run_node(n)
        except CertifyFxError:
            raise
        except Exception as exc:  # a rule's own failure: refuse the node, never a raw traceback
            raise _node_error(self.module, n, f"could not be bounded ({type(exc).__name__}: {exc})",
                              "rewrite the operation with supported ones") from exc

    def _input_dependent(self, n: fx.Node) -> Any:
        if not n.users:
            return None  # dead code: nothing reads it (side effects were checked before)
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
        result = self.apply(rule, args, kwargs, module)
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
            if recorded[0] != _EXAMPLE_BATCH:
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


def _check_input_shape(input_shape: Any) -> Shape:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(s <= 0 for s in shape) or tuple(input_shape) != shape:
        raise CertifyFxError(f"input_shape must be one input's shape without the batch dim, a tuple of positive "
                             f"ints such as (3, 32, 32); got {input_shape!r}")
    return shape


def _pairwise_distances(rows: torch.Tensor) -> torch.Tensor:
    """``||r_i - r_j||`` for all pairs via the Gram matrix (no per-class loops).

    Differentiable everywhere: where a squared distance is 0 (the diagonal, equal rows) the square
    root's derivative is infinite, and ``inf * 0`` would be a NaN gradient; those entries take the
    root of 1 instead and are then set to 0. NaN stays NaN (an unproven bound, never a radius).
    """
    gram = rows @ rows.T
    sq = gram.diagonal()
    squared = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    zero = squared == 0
    return torch.where(zero, 0.0, torch.where(zero, torch.ones_like(squared), squared).sqrt())


class BoundCompiler(nn.Module):
    """A model traced once, whose margin Lipschitz bound can be re-evaluated as weights change.

    Holds the power-iteration iterates as buffers, allocated from the traced shapes, so that
    training can take one step per forward (:meth:`estimate`) and a checkpoint keeps them;
    :meth:`sound_bound` gives the proven bound for certification. The traced model is not a
    submodule (its parameters are the model's), so ``state_dict`` holds only the iterates.

    Args:
        model: the classifier (eval mode for BatchNorm).
        input_shape: shape of one input, without batch (e.g. ``(3, 32, 32)``).
        materialize_limit: composite or FFT-bounded operators with at most this many input and
            output entries are materialised and their norm computed exactly (a 2048-entry
            operator takes about 1 s); 0 disables it.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], materialize_limit: int = 2048) -> None:
        super().__init__()
        self.input_shape = _check_input_shape(input_shape)
        self.materialize_limit = materialize_limit
        # not submodules: see the class docstring
        model = unwrap_model(model)
        self.__dict__["model"] = model
        gm, self._recording = traced_and_recorded(model, self.input_shape)
        self.__dict__["graph_module"] = gm
        self.structure = model_fingerprint(model, weights=False).structure
        self._iterate_names: dict[str, str] = {}
        with torch.no_grad():
            self.estimate(steps=0)  # discovers every operator and allocates its iterate
        # after the rules, whose refusals say more (BatchNorm in training mode: "call model.eval()")
        check_pure_forward(model, gm, self._recording, self.input_shape)

    # -- norms -----------------------------------------------------------------------------
    def _materialize(self, op: LinearOperator) -> bool:
        small = max(math.prod(op.in_shape), math.prod(op.out_shape)) <= self.materialize_limit
        return small and not has_exact_bound(op)

    def _sound_norm(self, steps: int, tol: float) -> Callable[[LinearOperator, str], Lipschitz]:
        def norm(op: LinearOperator, key: str) -> Lipschitz:
            with torch.no_grad():
                b = materialized_bound(op) if self._materialize(op) else op.upper_bound()
                est = self._estimate(op, key, steps, tol, persist=False).item() if steps else math.nan
            return Lipschitz(b.value, est, b.sound, b.method)

        return norm

    def _iterate(self, key: str, shape: Shape) -> torch.Tensor:
        name = self._iterate_names.get(key)
        if name is None:
            like = next(self.graph_module.parameters(), None)
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            vector = torch.randn(1, *shape, generator=generator)
            if like is not None:
                vector = vector.to(dtype=like.dtype, device=like.device)
            name = f"iterate_{len(self._iterate_names)}"
            self.register_buffer(name, vector / vector.norm())
            self._iterate_names[key] = name
        return getattr(self, name)

    def _estimate(self, op: LinearOperator, key: str, steps: int, tol: float | None, persist: bool) -> torch.Tensor:
        vector = self._iterate(key, op.in_shape)
        sigma, updated = power_iteration(op.apply, op.adjoint, vector, steps, tol)
        if persist:
            vector.copy_(updated)
        return sigma

    def _margin_fn(self, sound: bool, norm: Callable[[LinearOperator, str], Lipschitz]):
        def margin(op: LinearOperator, key: str):
            m = op.out_shape[0]
            if sound and m * math.prod(op.in_shape) <= self.materialize_limit * 2**14:
                # rows a_i = A^T e_i, exactly: ||(e_i - e_j)^T A|| = ||a_i - a_j||
                rows = op.to(torch.float64).adjoint(torch.eye(m, dtype=torch.float64)).reshape(m, -1)
                dist = _pairwise_distances(rows) * (1 + SAFETY)
                return dist, dist, Lipschitz(1.0, 1.0, True, "exact"), f"rows of {op.describe()}"
            ops = op.ops if isinstance(op, Compose) else [op]
            head = ops[-1]
            if isinstance(head, Dense) and len(head.in_shape) == 1:
                rest_ops = ops[:-1]
                weight = head.weight.detach().to(torch.float64) if sound else head.weight
                dist = _pairwise_distances(weight)
                dist_bound = dist.detach().to(torch.float64) * (1 + SAFETY)
                if not rest_ops:
                    return dist_bound, dist, Lipschitz(1.0, 1.0, True), head.describe()
                rest = rest_ops[0] if len(rest_ops) == 1 else Compose(rest_ops)
                return dist_bound, dist, norm(rest, key), f"{head.describe()} . {rest.describe()}"
            # ||(e_i - e_j)^T A|| <= sqrt(2) ||A||
            pair = torch.full((m, m), math.sqrt(2.0), dtype=torch.float64)
            return pair, pair, norm(op, key), op.describe()

        return margin

    # -- evaluation ------------------------------------------------------------------------
    def _run(self, norm, margin, progress: ProgressLike | None = None) -> tuple[Evaluator, Any]:
        """Evaluate the graph; returns the evaluator and the output (the margin tuple of logits,
        or the output value itself when ``margin`` is None)."""
        on_node = task = None
        if progress is not None:
            task = progress.add_task("bound", total=len(self.graph_module.graph.nodes), info="")
            on_node = lambda node: progress.update(task, advance=1, info=node.name)  # noqa: E731
        evaluator = Evaluator(self.graph_module, self._recording, norm, margin, logits=margin is not None,
                              on_node=on_node)
        try:
            output = evaluator.run(torch.empty(0))  # the placeholder value is never used
        finally:
            if task is not None:
                progress.remove_task(task)
        return evaluator, (evaluator.output_margin if margin is not None else output)

    def _check_structure(self) -> Fingerprint:
        fingerprint = model_fingerprint(self.model)
        if fingerprint.structure != self.structure:
            raise CertifyFxError("the model's structure changed since it was traced (a replaced submodule, a "
                                 "changed attribute, a hook); compile it again")
        return fingerprint

    @torch.no_grad()
    def output_lipschitz(self, estimate_steps: int = 0, tol: float = 1e-6,
                         progress: ProgressLike | None = None) -> Lipschitz:
        """A proven bound on the l2 Lipschitz constant of the whole output, of any shape (a feature
        extractor's, say), with a power-iteration estimate when ``estimate_steps`` > 0."""
        self._check_structure()
        evaluator, output = self._run(self._sound_norm(estimate_steps, tol), None, progress)
        lip = evaluator.lipschitz_of(output, "output")
        return lip if math.isfinite(lip.bound) else Lipschitz(lip.bound, lip.estimate, False, lip.method)

    @torch.no_grad()
    def sound_bound(self, estimate_steps: int = 100, tol: float = 1e-6,
                    progress: ProgressLike | None = None) -> LipschitzBound:
        """The proven bound (and a power-iteration estimate with ``estimate_steps`` iterations);
        ``progress`` (see :func:`certify_fx.progress.progress_display`) shows one step per node."""
        fingerprint = self._check_structure()
        norm = self._sound_norm(estimate_steps, tol)
        evaluator, (margin, estimate, penultimate, sound) = self._run(norm, self._margin_fn(True, norm), progress)
        margin = margin.clone()
        margin.fill_diagonal_(0)
        estimate = torch.as_tensor(estimate, dtype=torch.float64).detach().clone()
        estimate.fill_diagonal_(0)
        if not estimate_steps:
            estimate.fill_(math.nan)
        sound = sound and bool(torch.isfinite(margin).all())  # NaN/inf weights: nothing is proven
        return LipschitzBound(margin, estimate, penultimate, sound, evaluator.rows, self.input_shape, fingerprint)

    def estimate(self, steps: int = 1, tol: float | None = None) -> torch.Tensor:
        """Differentiable (m, m) margin estimate from persisted power-iteration iterates (training)."""

        def norm(op: LinearOperator, key: str) -> Lipschitz:
            sigma = self._estimate(op, key, steps, tol, persist=True)
            return Lipschitz(math.nan, sigma, False, "power-iteration")

        _, (_, estimate, _, _) = self._run(norm, self._margin_fn(False, norm))
        mask = 1 - torch.eye(estimate.shape[0], dtype=estimate.dtype, device=estimate.device)
        return estimate * mask


def linear_form(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> Tracked:
    """The folded linear operators from ``gm``'s input to its output.

    The result's ``form`` has the input placeholder as its only source exactly when the graph is
    affine in its input; used by the folding passes of :mod:`certify_fx.transforms`.
    """
    gm, recording = traced_and_recorded(gm, _check_input_shape(input_shape))

    def no_norm(op: LinearOperator, key: str) -> Lipschitz:
        return Lipschitz(math.nan, math.nan, False)

    evaluator = Evaluator(gm, recording, no_norm, None, logits=False)
    with torch.no_grad():
        return evaluator.run(torch.empty(0))


def bound(model: nn.Module, input_shape: tuple[int, ...], estimate_steps: int = 100,
          materialize_limit: int = 2048, progress: ProgressLike | None = None) -> LipschitzBound:
    """Sound per-margin Lipschitz constants of ``model`` on inputs of ``input_shape``.

    Args:
        model: a classifier returning (batch, classes) logits; BatchNorm must be in eval mode.
        input_shape: one input's shape without batch, e.g. ``(3, 224, 224)``.
        estimate_steps: power-iteration steps for ``.estimate`` (0 skips the estimate).
        materialize_limit: operators this small are materialised and bounded exactly.
        progress: a progress display (:func:`certify_fx.progress.progress_display`) to show one
            step per graph node on; the wide convolutions of big models take minutes on a CPU.

    Raises:
        UnsupportedNodeError: a node whose Lipschitz behaviour is unknown or unbounded; the
            message names the node, its op, and the fix.
    """
    task = progress.add_task("trace", total=None, info="") if progress is not None else None
    compiler = BoundCompiler(model, input_shape, materialize_limit)
    if task is not None:
        progress.remove_task(task)
    return compiler.sound_bound(estimate_steps, progress=progress)
