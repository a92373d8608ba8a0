"""Analysis: the example runs and the checks that decide what the compiler may accept.

Before any rule runs, the captured graph is classified by dataflow (:mod:`.dependence`), checked
for what it hides (hooks, random ops, ``out=`` writes, in-place writes that are read again), and
run on example batches (:func:`record`): a batch of 2 and a reordered batch of 3 prove that every
input-dependent tensor keeps the batch in front and that one input's values do not depend on its
batch; :func:`check_pure_forward` proves the model's own forward is the graph's pure function.
This is the narrow API the transforms use too (:func:`traced_and_recorded`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import CertifyFxError, UnsupportedNodeError
from . import rules
from .capture import CaptureMode, capture, example_input, node_error
from .dependence import Dependence, check_hooks, check_mutations, input_dependence
from .module_state import ModuleState, unwrap_model
from .spectral import Region, find_regions
from .values import Shape

__all__ = ["EXAMPLE_BATCH", "RECORDED_LEVELS", "Recording", "example_shapes", "record", "check_structure", "check_pure_forward",
           "traced_and_recorded"]

#: the example batch every recorded shape and value has (the reordered run has one more)
EXAMPLE_BATCH = 2


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
    #: the Fourier-domain stretches of the graph (:mod:`.spectral`)
    regions: list[Region] = field(default_factory=list)


#: the classes whose values come from the example runs
RECORDED_LEVELS = (Dependence.SHAPE, Dependence.BROADCAST, Dependence.BATCH)


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
            raise node_error(self.module, n, f"failed on an example input: {type(exc).__name__}: {exc}",
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
        if level in RECORDED_LEVELS:
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


def example_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[str, Shape]:
    """Each node's output shape on one example batch: a single forward, buffers restored (what
    the conversion passes need between rewrites; :func:`record` proves much more with two)."""
    return _run_example(gm, {}, _example_batch(input_shape, EXAMPLE_BATCH, gm)).shapes


def _check_batch_dim(gm: fx.GraphModule, dependence: dict[fx.Node, Dependence], input_shape: tuple[int, ...]) -> None:
    """Say so when a failing ``input_shape`` works without its first entry (``(1, 3, 32, 32)``
    written as torchinfo users do, batch included)."""
    if len(input_shape) < 2 or input_shape[0] != 1:
        return
    try:
        _run_example(gm, dependence, _example_batch(input_shape[1:], EXAMPLE_BATCH, gm))
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
    return (_row_uniform(two, EXAMPLE_BATCH) and _row_uniform(three, EXAMPLE_BATCH + 1)
            and torch.equal(two[0], three[0]))


def _check_batch_independence(gm: fx.GraphModule, two: Recording, three: Recording) -> None:
    """Every input-dependent tensor keeps the batch in front, and one input's values do not depend
    on the batch size or on the input's position in the batch (a node whose rows differ is refused
    by the evaluator, after its rule)."""
    dependence = two.dependence
    inside = {n.name for region in two.regions for n in region.nodes if n not in region.exits}
    input_nodes = {n.name: n for n, d in dependence.items() if d == Dependence.INPUT and n.name not in inside}
    for key, shape2 in two.shapes.items():  # keys are node names, or "name.i" for tuple parts
        node, shape3 = input_nodes.get(key.split(".")[0]), three.shapes.get(key)
        if node is None or not shape2 or shape2[0] != EXAMPLE_BATCH or shape3 is None:
            continue  # a batch dim that is visibly gone is refused by the node's rule, with its reason
        if not shape3 or shape3[0] != EXAMPLE_BATCH + 1 or shape2[1:] != shape3[1:]:
            raise node_error(gm, node, f"the batch dimension does not stay in front (shape {shape2} for a batch "
                              f"of 2, {shape3} for a batch of 3): the operation mixes examples of a batch",
                              "keep the batch as dim 0 and use x.shape[0] for it")
        if key in two.rows and key in three.rows and not _rows_agree(two.rows[key], three.rows[key]):
            two.batch_dependent.add(node.name)  # refused after the node's rule, whose reason comes first


def record(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> Recording:
    """Run ``gm`` on an example batch of 2, and of 3 holding the same inputs in another order, to
    prove that every input-dependent tensor keeps the batch in front and that nothing of one input
    depends on the batch size or order; buffers are restored."""
    dependence = input_dependence(gm)
    x = _example_batch(input_shape, EXAMPLE_BATCH, gm)
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
    recording.regions = find_regions(gm, recording.dependence, recording.shapes, other.shapes, recording.dtypes,
                                     EXAMPLE_BATCH)
    _check_batch_independence(gm, recording, other)
    return recording


def _fail_at(gm: fx.GraphModule):
    def fail(node, reason, fix=None):
        raise node_error(gm, node, reason, fix)

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
    x = _example_batch(input_shape, EXAMPLE_BATCH, gm)
    before = ModuleState(model)
    try:
        with torch.no_grad():
            first = model(x)
            after_first = ModuleState(model)
            second = model(x)
        changed = after_first.changes()
    except Exception as exc:
        raise node_error(gm, None, f"the model's forward fails on an example input: {type(exc).__name__}: {exc}",
                          "check input_shape") from exc
    finally:
        before.restore()
    if changed:
        raise node_error(gm, None, f"forward changes the model's state on every call ('{changed[0]}'), so the "
                          "model is not one function of its input", "compute the value in forward without storing "
                          "it, or keep it as a parameter or buffer that forward only reads")
    if not _same_outputs(first, second):
        raise node_error(gm, None, "two runs of the model on the same input differ (Python randomness, or state "
                          "read in forward), so no certificate holds", "make forward deterministic: no random, no "
                          "state that changes between calls")
    if not _same_outputs(first, recording.output):
        raise node_error(gm, None, "the traced graph computes something else than the model's forward (a value "
                          "read once at tracing, such as random.random() or a Python attribute, was baked in)",
                          "compute that value with tensor ops inside forward, or make it a buffer")


def traced_and_recorded(model: nn.Module, input_shape: tuple[int, ...],
                        mode: CaptureMode = "auto") -> tuple[fx.GraphModule, Recording]:
    """Capture ``model`` (a known wrapper is unwrapped; the model is left as it was; ``mode``: see
    :func:`~.capture.capture`), check its structure, record the example runs and check its
    in-place ops."""
    model = unwrap_model(model)
    gm = capture(model, input_shape, mode)
    check_structure(model, gm)
    recording = record(gm, input_shape)
    check_mutations(gm, recording.dependence, recording.shapes, _fail_at(gm))
    return gm, recording
