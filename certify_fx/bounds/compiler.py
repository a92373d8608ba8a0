"""The bound compiler: per-margin Lipschitz constants ``K[i, j]`` from a model.

Four stages, each its own module: capture (:mod:`.capture`: the model as a torch.fx graph),
analysis (:mod:`.analysis`: dataflow, example runs, the acceptance checks), evaluation
(:mod:`.evaluation`: the rules, :mod:`.registry`, run as an abstract interpreter) and the result
(:mod:`.result`). :class:`BoundCompiler` holds a model captured and analysed once, whose bound is
re-evaluated as weights change (power-iteration iterates persist for training); :func:`bound`
proves it once. Any failure names the node, its op and the fix; nothing is assumed 1-Lipschitz.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..errors import CertifyFxError
from .analysis import check_pure_forward, traced_and_recorded
from .cache import norm_cache
from .capture import CaptureMode
from .evaluation import Evaluator
from .fingerprint import Fingerprint, model_fingerprint
from .module_state import unwrap_model
from .norms import SAFETY
from .operators import Compose, Dense, LinearOperator, has_exact_bound, materialized_bound
from .power_iteration import power_iteration
from .result import LipschitzBound
from .values import Lipschitz, Shape, Tracked

if TYPE_CHECKING:
    from ..progress import ProgressLike

__all__ = ["BoundCompiler", "bound", "linear_form"]


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


def _progress_info(node: fx.Node, rows: list) -> str:
    """The node just bounded, and the slowest so far with its share of the time so far."""
    total = sum(r.seconds for r in rows)
    slowest = max(rows, key=lambda r: r.seconds, default=None)
    if slowest is None or total < 1.0:
        return node.name
    return f"{node.name}; slowest {slowest.node} {slowest.seconds:.1f} s ({slowest.seconds / total:.0%})"


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
        capture: how the graph is built (:data:`~.capture.CAPTURE_MODES`): symbolic tracing, with
            ``torch.export`` where tracing fails (``"auto"``), or only one of them.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], materialize_limit: int = 2048,
                 capture: CaptureMode = "auto") -> None:
        super().__init__()
        self.input_shape = _check_input_shape(input_shape)
        self.materialize_limit = materialize_limit
        # not submodules: see the class docstring
        model = unwrap_model(model)
        self.__dict__["model"] = model
        gm, self._recording = traced_and_recorded(model, self.input_shape, capture)
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
                b = materialized_bound(op) if self._materialize(op) else norm_cache.upper_bound(op)
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
        task = None
        evaluator = Evaluator(self.graph_module, self._recording, norm, margin, logits=margin is not None)
        if progress is not None:
            task = progress.add_task("bound", total=len(self.graph_module.graph.nodes), info="")
            evaluator.on_node = lambda node: progress.update(  # noqa: E731
                task, advance=1, info=_progress_info(node, evaluator.rows))
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
          materialize_limit: int = 2048, progress: ProgressLike | None = None,
          capture: CaptureMode = "auto") -> LipschitzBound:
    """Sound per-margin Lipschitz constants of ``model`` on inputs of ``input_shape``.

    Args:
        model: a classifier returning (batch, classes) logits; BatchNorm must be in eval mode.
        input_shape: one input's shape without batch, e.g. ``(3, 224, 224)``.
        estimate_steps: power-iteration steps for ``.estimate`` (0 skips the estimate).
        materialize_limit: operators this small are materialised and bounded exactly.
        progress: a progress display (:func:`certify_fx.progress.progress_display`) to show one
            step per graph node on; the wide convolutions of big models take minutes on a CPU.
        capture: ``"auto"`` traces the model symbolically (torch.fx) and, where that fails (Python
            on weights, branches on the input's shape), captures it with ``torch.export``;
            ``"symbolic"`` or ``"export"`` forces one path. An exported graph is proven for
            ``input_shape`` (export specialises on every size but the batch).

    The proven norms of wide layers are kept by content (:mod:`.cache`): bounding the same
    weights again, in this process or a later one, reads them back instead of proving them again.

    Raises:
        UnsupportedNodeError: a node whose Lipschitz behaviour is unknown or unbounded; the
            message names the node, its op, and the fix.
    """
    task = progress.add_task("trace", total=None, info="") if progress is not None else None
    compiler = BoundCompiler(model, input_shape, materialize_limit, capture)
    if task is not None:
        progress.remove_task(task)
    return compiler.sound_bound(estimate_steps, progress=progress)
