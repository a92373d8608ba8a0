"""The bound compiler: per-margin Lipschitz constants ``K[i, j]`` from a torch.fx graph.

:func:`bound` traces the model, propagates shapes once, and then *abstractly interprets* the
graph: nodes that do not depend on the input are computed for real (weights, normalised weights,
shapes), while every input-dependent tensor is represented as a sum of linear operators applied
to earlier "sources" (the input, or the output of a nonlinearity). Linear stretches are folded
(:mod:`.operators`) and only bounded where a nonlinearity or the output consumes them:

* at a nonlinearity ``v = act(u)``: ``K(v) = c_act * sum_s ||A_us|| K(s)``;
* at the output ``f = sum_s A_s(s)``: ``K[i, j] = sum_s ||(e_i - e_j)^T A_s|| K(s)``, exact from the
  Gram matrix of the last dense layer when ``A_s`` ends in one.

Unknown operations raise :class:`~certify_fx.errors.UnsupportedNodeError`: nothing is assumed
1-Lipschitz.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedNodeError
from ..tracing import example_input, trace
from .norms import SAFETY, NormBound
from .power_iteration import power_iteration
from .operators import Compose, Dense, Identity, LinearOperator, compose, has_exact_bound, materialized_bound

__all__ = ["Tracked", "NodeBound", "LipschitzBound", "BoundCompiler", "bound"]

Shape = tuple[int, ...]
_EXAMPLE_BATCH = 2


@dataclass
class Tracked:
    """An input-dependent tensor: ``sum_s form[s](value of source s)`` plus a constant."""

    shape: Shape
    form: dict[str, LinearOperator]


@dataclass(frozen=True)
class NodeBound:
    """One row of the per-node breakdown.

    ``factor`` is what this node multiplies the Lipschitz constant by (a folded operator's norm
    bound, or an activation's constant); ``lipschitz`` is the resulting bound w.r.t. the input.
    """

    node: str
    op: str
    kind: str  # input | linear | activation | output
    factor: float
    factor_estimate: float
    lipschitz: float
    lipschitz_estimate: float
    method: str
    sound: bool


@dataclass
class _Lip:
    bound: float
    estimate: Any  # float, or a differentiable tensor when training
    sound: bool = True
    method: str = "exact"


@dataclass
class LipschitzBound:
    """Margin Lipschitz constants of a classifier, with how they were obtained.

    Attributes:
        margin: (m, m) tensor; ``margin[i, j]`` bounds the Lipschitz constant of ``f_i - f_j``.
        estimate: the power-iteration counterpart of ``margin`` (same formula, estimated norms).
        penultimate: bound on the Lipschitz constant of the input to the last dense layer.
        sound: True only if every factor is a proven upper bound.
        nodes: per-node breakdown.
    """

    margin: torch.Tensor
    estimate: torch.Tensor
    penultimate: float
    sound: bool
    nodes: list[NodeBound] = field(default_factory=list)
    input_shape: Shape = ()

    @property
    def num_classes(self) -> int:
        return self.margin.shape[0]

    @property
    def max_margin(self) -> float:
        return float(self.margin.max())

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
    name = f"Tensor.{node.target}" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        return f"{name} in {getattr(cls, '__name__', cls)} ({path})"
    return name


def _float(value: Any) -> float:
    return float(value.detach().max()) if isinstance(value, torch.Tensor) else float(value)


def _has_tracked(obj: Any) -> bool:
    if isinstance(obj, Tracked):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_tracked(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_tracked(o) for o in obj.values())
    return False


class _Recorder(fx.Interpreter):
    """Runs the graph once on an example batch and records each node's output shape/value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.shapes: dict[str, Shape] = {}
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise UnsupportedNodeError(
                n.name, _target_name(n, self.module), f"failed on an example input: {type(exc).__name__}: {exc}",
                "check input_shape, or that the module accepts a batch of that shape",
            ) from exc
        if isinstance(result, torch.Tensor):
            self.shapes[n.name] = tuple(result.shape)
        else:
            self.values[n.name] = result
        return result


class Evaluator(fx.Interpreter):
    """Abstract interpreter computing Lipschitz bounds; rules in :mod:`.rules` extend it.

    Args:
        gm: the traced model.
        shapes: per-node output shapes from an example batch (batch dim included).
        values: per-node non-tensor outputs (sizes, flags) from the same run.
        norm: computes (bound, estimate) of a linear operator; keyed for persisted iterates.
    """

    def __init__(self, gm: fx.GraphModule, shapes: dict[str, Shape], values: dict[str, Any],
                 norm: Callable[[LinearOperator, str], _Lip], margin: Callable[[LinearOperator, str], tuple],
                 logits: bool = True) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.extra_traceback = False  # our errors already name the node
        self.shapes, self.values = shapes, values
        self._norm, self._margin = norm, margin
        self.lipschitz: dict[str, _Lip] = {}
        self.rows: list[NodeBound] = []
        self._consumed: dict[str, _Lip] = {}
        self.node: fx.Node | None = None
        self.output_margin: tuple | None = None
        self.logits = logits
        param = next(iter(gm.parameters()), None)
        self.dtype = param.dtype if param is not None else torch.get_default_dtype()

    # -- helpers for rules ------------------------------------------------------------------
    def shape(self, node: fx.Node | None = None) -> Shape:
        """Output shape of ``node`` (default: the current node), without the batch dim."""
        node = node or self.node
        return self.shapes[node.name][1:]

    def fail(self, reason: str, fix: str | None = None, error: type[UnsupportedNodeError] = UnsupportedNodeError):
        node = self.node
        raise error(node.name, _target_name(node, self.module), reason, fix)

    def linear(self, value: Tracked, op: LinearOperator) -> Tracked:
        """Apply a linear operator (built for ``value.shape``) to a tracked value."""
        return Tracked(op.out_shape, {s: compose(op, a) for s, a in value.form.items()})

    def lipschitz_of(self, value: Tracked, name: str) -> _Lip:
        """Bound and estimate of the Lipschitz constant of ``value`` w.r.t. the input."""
        if name in self._consumed:
            return self._consumed[name]
        total = _Lip(0.0, 0.0, True)
        factors: list[tuple[_Lip, NormBound]] = []
        methods, descriptions = set(), []
        for source, op in value.form.items():
            if isinstance(op, Identity):
                lip = self.lipschitz[source]
                total = _Lip(total.bound + lip.bound, total.estimate + lip.estimate, total.sound and lip.sound)
                continue
            norm = self._norm(op, f"{name}<-{source}")
            lip = self.lipschitz[source]
            total = _Lip(total.bound + norm.bound * lip.bound, total.estimate + norm.estimate * lip.estimate,
                         total.sound and norm.sound and lip.sound)
            factors.append((norm, None))
            methods.add(norm.method)
            descriptions.append(op.describe())
        if factors:
            single = len(value.form) == 1
            self.rows.append(NodeBound(
                name, "; ".join(descriptions), "linear",
                factors[0][0].bound if single else math.nan,
                _float(factors[0][0].estimate) if single else math.nan,
                total.bound, _float(total.estimate), "+".join(sorted(m for m in methods if m)) or "exact", total.sound,
            ))
        self._consumed[name] = total
        return total

    def nonlinear(self, value: Tracked, constant: float, arg_node: fx.Node | None, what: str | None = None) -> Tracked:
        """A nonlinearity with Lipschitz constant ``constant``: the result becomes a new source."""
        node = self.node
        inner = self.lipschitz_of(value, arg_node.name if arg_node is not None else node.name + ".in")
        lip = _Lip(constant * inner.bound, constant * inner.estimate, inner.sound)
        self.lipschitz[node.name] = lip
        self.rows.append(NodeBound(node.name, what or _target_name(node, self.module), "activation", constant, constant,
                                   lip.bound, _float(lip.estimate), "exact", inner.sound))
        shape = self.shape()
        return Tracked(shape, {node.name: Identity(shape)})

    # -- interpreter -----------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        return super().run_node(n)

    def placeholder(self, target, args, kwargs):
        node = self.node
        if any(self.lipschitz):  # only the first placeholder is the certified input
            if args:
                return args[0]
            self.fail("models with more than one tensor input are not supported")
        shape = self.shape()
        self.lipschitz[node.name] = _Lip(1.0, 1.0, True)
        self.rows.append(NodeBound(node.name, f"input {shape}", "input", 1.0, 1.0, 1.0, 1.0, "exact", True))
        return Tracked(shape, {node.name: Identity(shape)})

    def _dispatch(self, kind: str, target, args, kwargs):
        from . import rules

        node = self.node
        if node.name in self.values:  # a shape, size or flag: fixed once the input shape is
            return self.values[node.name]
        if kind == "call_module":
            module = self.fetch_attr(target)
            rule = rules.module_rule(module)
            if rule is None:
                self.fail(
                    f"no Lipschitz rule for module type {type(module).__module__}.{type(module).__name__}",
                    "replace the module, or register a rule with certify_fx.bounds.register_module_rule",
                )
            result = rule(self, node, module, args, kwargs)
        else:
            rule = (rules.FUNCTION_RULES if kind == "call_function" else rules.METHOD_RULES).get(target)
            if rule is None:
                self.fail(
                    "no Lipschitz rule for this operation",
                    "rewrite it with supported ops, or register one with certify_fx.bounds.register_function_rule",
                )
            result = rule(self, node, args, kwargs)
        if isinstance(result, Tracked) and self.shapes.get(node.name, (None,))[0] != _EXAMPLE_BATCH:
            self.fail("the operation mixes the batch dimension with other dimensions")
        return result

    def call_function(self, target, args, kwargs):
        if _has_tracked((args, kwargs)):
            return self._dispatch("call_function", target, args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if _has_tracked((args, kwargs)):
            return self._dispatch("call_method", target, args, kwargs)
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        if _has_tracked((args, kwargs)):
            return self._dispatch("call_module", target, args, kwargs)
        return super().call_module(target, args, kwargs)

    def output(self, target, args, kwargs):
        (result,) = args
        if not isinstance(result, Tracked):
            self.fail("the model output must be one tensor of logits that depends on the input")
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


def _pairwise_distances(rows: torch.Tensor) -> torch.Tensor:
    """``||r_i - r_j||`` for all pairs via the Gram matrix (no per-class loops)."""
    gram = rows @ rows.T
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt()


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
        self.input_shape = tuple(input_shape)
        self.materialize_limit = materialize_limit
        self.__dict__["graph_module"] = trace(model)  # not a submodule: see the class docstring
        self._shapes, self._values = record(self.graph_module, self.input_shape)
        self._iterate_names: dict[str, str] = {}
        with torch.no_grad():
            self.estimate(steps=0)  # discovers every operator and allocates its iterate

    # -- norms -----------------------------------------------------------------------------
    def _materialize(self, op: LinearOperator) -> bool:
        small = max(math.prod(op.in_shape), math.prod(op.out_shape)) <= self.materialize_limit
        return small and not has_exact_bound(op)

    def _sound_norm(self, steps: int, tol: float) -> Callable[[LinearOperator, str], _Lip]:
        def norm(op: LinearOperator, key: str) -> _Lip:
            with torch.no_grad():
                b = materialized_bound(op) if self._materialize(op) else op.upper_bound()
                est = self._estimate(op, key, steps, tol, persist=False).item() if steps else math.nan
            return _Lip(b.value, est, b.sound, b.method)

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

    def _margin_fn(self, sound: bool, norm: Callable[[LinearOperator, str], _Lip]):
        def margin(op: LinearOperator, key: str):
            m = op.out_shape[0]
            if sound and m * math.prod(op.in_shape) <= self.materialize_limit * 2**14:
                # rows a_i = A^T e_i, exactly: ||(e_i - e_j)^T A|| = ||a_i - a_j||
                rows = op.to(torch.float64).adjoint(torch.eye(m, dtype=torch.float64)).reshape(m, -1)
                dist = _pairwise_distances(rows) * (1 + SAFETY)
                return dist, dist, _Lip(1.0, 1.0, True, "exact"), f"rows of {op.describe()}"
            ops = op.ops if isinstance(op, Compose) else [op]
            head = ops[-1]
            if isinstance(head, Dense) and len(head.in_shape) == 1:
                rest_ops = ops[:-1]
                weight = head.weight.detach().to(torch.float64) if sound else head.weight
                dist = _pairwise_distances(weight)
                dist_bound = dist.detach().to(torch.float64) * (1 + SAFETY)
                if not rest_ops:
                    return dist_bound, dist, _Lip(1.0, 1.0, True), head.describe()
                rest = rest_ops[0] if len(rest_ops) == 1 else Compose(rest_ops)
                return dist_bound, dist, norm(rest, key), f"{head.describe()} . {rest.describe()}"
            # ||(e_i - e_j)^T A|| <= sqrt(2) ||A||
            pair = torch.full((m, m), math.sqrt(2.0), dtype=torch.float64)
            return pair, pair, norm(op, key), op.describe()

        return margin

    # -- evaluation ------------------------------------------------------------------------
    def _run(self, norm, margin) -> tuple[Evaluator, tuple]:
        evaluator = Evaluator(self.graph_module, self._shapes, self._values, norm, margin)
        evaluator.run(torch.empty(0))  # the placeholder value is never used
        return evaluator, evaluator.output_margin

    @torch.no_grad()
    def sound_bound(self, estimate_steps: int = 100, tol: float = 1e-6) -> LipschitzBound:
        """The proven bound (and a power-iteration estimate with ``estimate_steps`` iterations)."""
        norm = self._sound_norm(estimate_steps, tol)
        evaluator, (margin, estimate, penultimate, sound) = self._run(norm, self._margin_fn(True, norm))
        margin = margin.clone()
        margin.fill_diagonal_(0)
        estimate = torch.as_tensor(estimate, dtype=torch.float64).detach().clone()
        estimate.fill_diagonal_(0)
        if not estimate_steps:
            estimate.fill_(math.nan)
        return LipschitzBound(margin.float(), estimate.float(), penultimate, sound, evaluator.rows, self.input_shape)

    def estimate(self, steps: int = 1, tol: float | None = None) -> torch.Tensor:
        """Differentiable (m, m) margin estimate from persisted power-iteration iterates (training)."""

        def norm(op: LinearOperator, key: str) -> _Lip:
            sigma = self._estimate(op, key, steps, tol, persist=True)
            return _Lip(math.nan, sigma, False, "power-iteration")

        _, (_, estimate, _, _) = self._run(norm, self._margin_fn(False, norm))
        mask = 1 - torch.eye(estimate.shape[0], dtype=estimate.dtype, device=estimate.device)
        return estimate * mask


def record(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> tuple[dict[str, Shape], dict[str, Any]]:
    """Run ``gm`` once on an example batch (batch 2) and return per-node shapes and non-tensor values.

    Buffers (BatchNorm running statistics) are restored afterwards.
    """
    recorder = _Recorder(gm)
    params = next(iter(gm.parameters()), None)
    dtype = params.dtype if params is not None else torch.float32
    device = params.device if params is not None else "cpu"
    saved = [b.detach().clone() for b in gm.buffers()]
    try:
        with torch.no_grad():
            recorder.run(example_input(tuple(input_shape), _EXAMPLE_BATCH, dtype, device))
    finally:
        with torch.no_grad():
            for buffer, value in zip(gm.buffers(), saved):
                buffer.copy_(value)
    return recorder.shapes, recorder.values


def linear_form(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> Tracked:
    """The folded linear operators from ``gm``'s input to its output.

    The result's ``form`` has the input placeholder as its only source exactly when the graph is
    affine in its input; used by the folding passes of :mod:`certify_fx.transforms`.
    """
    shapes, values = record(gm, input_shape)

    def no_norm(op: LinearOperator, key: str) -> _Lip:
        return _Lip(math.nan, math.nan, False)

    evaluator = Evaluator(gm, shapes, values, no_norm, None, logits=False)
    with torch.no_grad():
        return evaluator.run(torch.empty(0))


def bound(model: nn.Module, input_shape: tuple[int, ...], estimate_steps: int = 100,
          materialize_limit: int = 2048) -> LipschitzBound:
    """Sound per-margin Lipschitz constants of ``model`` on inputs of ``input_shape``.

    Args:
        model: a classifier returning (batch, classes) logits; BatchNorm must be in eval mode.
        input_shape: one input's shape without batch, e.g. ``(3, 224, 224)``.
        estimate_steps: power-iteration steps for ``.estimate`` (0 skips the estimate).
        materialize_limit: operators this small are materialised and bounded exactly.

    Raises:
        UnsupportedNodeError: a node whose Lipschitz behaviour is unknown or unbounded; the
            message names the node, its op, and the fix.
    """
    return BoundCompiler(model, input_shape, materialize_limit).sound_bound(estimate_steps)
