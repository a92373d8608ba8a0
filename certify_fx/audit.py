"""Evidence for a certificate: attacks inside certified radii, the certification gap, and how
tight ``K`` is.

:func:`audit` answers two questions about a model and its certificates on a dataset:

* *Is the certificate right?* Every point certified at radius ``r`` is attacked inside the ball
  of radius ``0.999 r`` by l2 PGD (restarts, a step schedule) and by a boundary-following attack
  (Newton steps ``x <- x - m(x) grad m(x) / ||grad m(x)||^2`` on the smallest margin
  ``m = f_pred - f_j``, projected onto the ball). Any change of the predicted class is a
  *violation*: the certificate was false. There must be none.
* *How much does it leave on the table?* At each ``eps``, the empirical robust accuracy (points
  correct and not flipped by the attacks at ``eps``: an upper bound on the true robust accuracy)
  next to the VRA (a lower bound), and, for the margins that decide most predictions, the proven
  ``K[i, j]`` against a lower bound on the true Lipschitz constant of ``f_i - f_j`` found by
  gradient ascent on ``||grad (f_i - f_j)||`` and secant slopes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import nn

from .bounds.values import NodeBound
from .certificates import Certificate, CertificateMethod, certificate_method, check_eps, evaluate_certified
from .errors import CertifyFxError

if TYPE_CHECKING:
    from .progress import ProgressLike

__all__ = ["AuditReport", "MarginTightness", "Violation", "attack", "audit", "margin_lower_bound"]

#: Attacks stay this fraction inside a certified radius (the radius itself is the boundary case).
INSIDE = 0.999


@dataclass
class Violation:
    """A point certified at ``radius`` whose prediction changed at l2 distance ``distance`` (for a
    top-k certificate: whose label ``predicted`` left the top k, ``became`` the k-th class above it)."""

    index: int
    radius: float
    distance: float
    predicted: int
    became: int


@dataclass
class MarginTightness:
    """The proven ``K[i, j]`` next to a lower bound on the Lipschitz constant of ``f_i - f_j``."""

    i: int
    j: int
    count: int  #: points whose prediction this margin decides (predicted i, runner-up j)
    bound: float
    lower: float

    @property
    def ratio(self) -> float:
        """``bound / lower`` (>= 1 for a sound bound; 1 means exact)."""
        return self.bound / self.lower if self.lower > 0 else math.inf


@dataclass
class AuditReport:
    """What :func:`audit` found; ``to_dict()`` gives the ``--json`` keys."""

    count: int
    clean_accuracy: float
    method: str
    vra: dict[float, float]
    empirical_robust_accuracy: dict[float, float]
    violations: list[Violation]
    k_tightness: list[MarginTightness]
    nodes: list[NodeBound] = field(default_factory=list, repr=False)
    radii: torch.Tensor | None = field(default=None, repr=False)  #: certified radius per point, 0 if wrong

    @property
    def sound(self) -> bool:
        """No attack succeeded inside a certified radius."""
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count, "clean_accuracy": self.clean_accuracy, "method": self.method,
            "violations": [asdict(v) for v in self.violations],
            "vra": {str(e): v for e, v in self.vra.items()},
            "empirical_robust_accuracy": {str(e): v for e, v in self.empirical_robust_accuracy.items()},
            "k_tightness": [{**asdict(t), "ratio": t.ratio} for t in self.k_tightness],
            "nodes": [asdict(n) for n in self.nodes],
        }


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def _worst_margin(model: nn.Module, x: torch.Tensor, pred: torch.Tensor,
                  top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``f_pred`` less the ``top_k``-th largest other logit, per input (negative where ``pred`` left
    the top ``top_k``; for ``top_k = 1``, where the prediction changed), and that other class."""
    logits = model(x)
    own = logits.gather(1, pred[:, None])[:, 0]
    other = logits.scatter(1, pred[:, None], -torch.inf).topk(top_k, dim=1)
    return own - other.values[:, -1], other.indices[:, -1]


def attack(model: nn.Module, x: torch.Tensor, pred: torch.Tensor, radius: torch.Tensor | float, *,
           steps: int = 30, restarts: int = 1, seed: int = 0,
           top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Search the l2 ball of ``radius`` (one per input) around each ``x`` for another class (with
    ``top_k > 1``: for a point where ``pred`` is no longer among the ``top_k`` largest logits).

    PGD on the worst margin (step ``2.5 r / steps``, halved for the last third) from the centre and
    from ``restarts`` random points, then the boundary-following attack from the best point found.
    Returns ``(flipped, distance, became)``: whether the prediction changed, at what l2 distance,
    and to which class (-1 where it did not; for ``top_k > 1``, the ``top_k``-th class above it).
    """
    radius = _expand(torch.as_tensor(radius, dtype=x.dtype, device=x.device).expand(len(x)), x)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    flipped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    distance = torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device)
    became = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    best = torch.zeros_like(x)
    best_margin = torch.full((len(x),), math.inf, device=x.device)

    def record(delta: torch.Tensor, margin: torch.Tensor, other: torch.Tensor) -> None:
        nonlocal best, best_margin
        hit = (margin < 0) & ~flipped
        distance[hit] = delta[hit].flatten(1).norm(dim=1).double()
        became[hit] = other[hit]
        flipped.logical_or_(margin < 0)
        better = margin < best_margin
        best = torch.where(_expand(better, x), delta, best)
        best_margin = torch.where(better, margin, best_margin)

    def project(delta: torch.Tensor) -> torch.Tensor:
        norm = _expand(delta.flatten(1).norm(dim=1).clamp_min(1e-12), x)
        return delta * (radius / norm).clamp(max=1.0)

    def probe(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The worst margin at ``x + delta`` (recorded) and its gradient."""
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            margin, other = _worst_margin(model, x + delta, pred, top_k)
            (grad,) = torch.autograd.grad(margin.sum(), delta)
        record(delta.detach(), margin.detach(), other)
        return margin.detach(), grad

    for run in range(restarts + 1):
        delta = torch.zeros_like(x)
        if run:
            noise = torch.randn(x.shape, generator=generator).to(x)
            scale = torch.rand(len(x), generator=generator).to(x)
            delta = project(noise * _expand(scale, x) * radius / _expand(noise.flatten(1).norm(dim=1), x))
        for step in range(steps):
            margin, grad = probe(delta)
            with torch.no_grad():
                size = 2.5 * radius / steps * (0.5 if step >= 2 * steps // 3 else 1.0)
                unit = grad / _expand(grad.flatten(1).norm(dim=1).clamp_min(1e-12), x)
                delta = project(delta.detach() - size * unit)
        with torch.no_grad():
            record(delta, *_worst_margin(model, x + delta, pred, top_k))
    delta = best
    for _ in range(steps // 2):  # boundary following: Newton steps on the worst margin, in the ball
        margin, grad = probe(delta)
        with torch.no_grad():
            squared = _expand(grad.flatten(1).square().sum(dim=1).clamp_min(1e-24), x)
            delta = project(delta.detach() - 1.02 * _expand(margin.clamp_min(0), x) * grad / squared)
    with torch.no_grad():
        record(delta, *_worst_margin(model, x + delta, pred, top_k))
    return flipped, distance, became


def margin_lower_bound(model: nn.Module, x: torch.Tensor, i: int, j: int, steps: int = 20) -> float:
    """A lower bound on the Lipschitz constant of ``f_i - f_j``: the largest gradient norm found by
    gradient ascent on ``||grad (f_i - f_j)||`` from ``x`` (falling back to sampling where the
    model has no double backward), and secant slopes ``|m(a) - m(b)| / ||a - b||`` along the way."""
    x = x.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.01)
    best = 0.0
    for _ in range(steps):
        with torch.enable_grad():
            out = model(x)
            (grad,) = torch.autograd.grad((out[:, i] - out[:, j]).sum(), x, create_graph=True)
            norms = grad.flatten(1).norm(dim=1)
            best = max(best, norms.max().item())
            optimizer.zero_grad()
            try:
                (-norms.sum()).backward()
            except RuntimeError:  # no double backward (e.g. max pooling's): move at random instead
                x.grad = torch.randn_like(x)
        optimizer.step()
        with torch.no_grad():
            step = torch.randn_like(x) * 1e-3
            a, b = model(x), model(x + step)
            slope = ((a[:, i] - a[:, j]) - (b[:, i] - b[:, j])).abs() / step.flatten(1).norm(dim=1)
            best = max(best, slope.max().item())
    return best


@torch.no_grad()
def audit(model: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]], eps: float | Sequence[float],
          bound: Any = None, *, method: str | CertificateMethod = "lipschitz", steps: int = 30,
          restarts: int = 1, tightness_pairs: int = 3, device: torch.device | str | None = None,
          progress: ProgressLike | None = None, top_k: int = 1) -> AuditReport:
    """Attack every certified point inside its radius, measure the certification gap and the
    tightness of ``K`` (see the module docstring).

    The certificates come from :func:`~certify_fx.certificates.evaluate_certified` (the loop
    ``certify-fx certify`` and the trainer use), so the VRA is theirs; the attacks run on each
    batch it certifies.

    Args:
        model: the classifier, in eval mode.
        data: batches ``(x, y)``.
        eps: radii for VRA and empirical robust accuracy.
        bound: the constants the certificates use (computed from the first batch if omitted); pass a
            tampered one to check that the audit catches false certificates.
        method: ``"lipschitz"``, ``"crc"`` or a method object (see :func:`certify_fx.certify`).
        steps, restarts: attack strength.
        tightness_pairs: how many of the most frequent (predicted, runner-up) margins to check.
        top_k: audit relaxed top-k certificates (``"lipschitz"`` only): each point whose label is
            certified to stay among the ``top_k`` largest logits is attacked to push it out, and
            the accuracies count labels among the top ``top_k``.
    """
    eps_list = [check_eps(eps)] if isinstance(eps, (int, float)) else sorted(check_eps(e) for e in eps)
    method = certificate_method(method, top_k=None if top_k == 1 else top_k)
    if getattr(method, "top_k", 1) != top_k:
        raise CertifyFxError(f"audit(top_k={top_k}) with a {type(method).__name__} certifying top "
                             f"{getattr(method, 'top_k', 1)}; pass the method's name, or build it with top_k={top_k}")
    robust = {e: 0 for e in eps_list}
    violations: list[Violation] = []
    pairs: Counter[tuple[int, int]] = Counter()
    examples: dict[tuple[int, int], torch.Tensor] = {}

    def report(where: torch.Tensor, flipped: torch.Tensor, distance: torch.Tensor, became: torch.Tensor,
               cert: Certificate, offset: int, radius: torch.Tensor, defended: torch.Tensor) -> None:
        """Record each flipped point of ``where`` as a violation, once per point."""
        seen = {v.index for v in violations}
        for k in flipped.nonzero()[:, 0].tolist():
            n = int(where[k])
            if offset + n not in seen:
                violations.append(Violation(offset + n, float(radius[n]), float(distance[k]), int(defended[n]),
                                            int(became[k])))

    def attack_batch(x: torch.Tensor, y: torch.Tensor, cert: Certificate, offset: int) -> str:
        hit = cert.correct(y)
        # the certificate's own claim: nothing changes the prediction (or drops the label from the
        # top k) inside the radius
        defended, radius = cert.defended(y)
        inside = (radius > 0) & torch.isfinite(radius)
        if inside.any():
            where = inside.nonzero()[:, 0]
            report(where, *attack(model, x[where], defended[where], INSIDE * radius[where].to(x.dtype), steps=steps,
                                  restarts=restarts, top_k=cert.top_k), cert, offset, radius, defended)
        # the certification gap at each eps: attacks on the correct points
        alive = hit.clone()
        for e in eps_list:
            if alive.any():
                where = alive.nonzero()[:, 0]
                flipped, distance, became = attack(model, x[where], defended[where], e, steps=steps,
                                                   restarts=restarts, top_k=cert.top_k)
                alive[where[flipped]] = False
                # certified at e, yet flipped
                report(where, flipped & (radius[where] > e), distance, became, cert, offset, radius, defended)
            robust[e] += int(alive.sum())
        logits = model(x)
        runner_up = logits.scatter(1, cert.pred[:, None], -torch.inf).argmax(1)
        for n, pair in enumerate(zip(cert.pred.tolist(), runner_up.tolist())):
            pairs[pair] += 1
            examples.setdefault(pair, x[n])
        return f"{len(violations)} violations"

    result = evaluate_certified(model, data, eps_list, method, bound, device=device, keep_radii=True,
                                progress=progress, description="audit", on_batch=attack_batch)
    lipschitz = method.margin_bound(result.bound) if result.bound is not None else None
    tightness = []
    for (i, j), n in pairs.most_common(tightness_pairs):
        start = examples[(i, j)][None].repeat(4, *([1] * examples[(i, j)].dim()))
        start = start + 0.05 * torch.randn_like(start)
        tightness.append(MarginTightness(i, j, n, float(lipschitz.margin[i, j]), margin_lower_bound(model, start, i, j)))
    total = max(result.count, 1)
    return AuditReport(result.count, result.clean_accuracy, method.name, result.vra,
                       {e: robust[e] / total for e in eps_list}, violations, tightness,
                       list(lipschitz.nodes) if lipschitz is not None else [], result.radii)
