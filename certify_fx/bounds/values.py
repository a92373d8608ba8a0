"""The values the bound compiler's abstract interpreter passes between nodes.

An input-dependent tensor is a :class:`Tracked` (a sum of linear operators applied to earlier
sources); an input-dependent result that is not continuous (the indices of ``max``/``sort``) is a
:class:`Refused`, which fails the moment any op reads it; a tuple-valued op returns a
:class:`TupleResult` of those. Rules (:mod:`.rules`) and the compiler (:mod:`.compiler`) both
import this module; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .operators import LinearOperator

__all__ = ["Shape", "Tracked", "Refused", "TupleResult", "Lipschitz", "NodeBound", "has_tracked", "find_refused"]

Shape = tuple[int, ...]


@dataclass(eq=False)
class Tracked:
    """An input-dependent tensor: ``sum_s form[s](value of source s)`` plus a constant.

    ``origin`` names the node that produced it (for persisted power-iteration iterates and the
    per-node table); ``lipschitz`` caches its bound once computed, on the value itself, so two
    different values fed by one node never share a cached constant.
    """

    shape: Shape
    form: dict[str, LinearOperator]
    origin: str | None = None
    lipschitz: "Lipschitz | None" = field(default=None, repr=False)


@dataclass(frozen=True)
class Refused:
    """An input-dependent value no rule can bound (e.g. argmax indices); reading it is an error."""

    reason: str
    fix: str | None = None


class TupleResult(tuple):
    """The tuple an op returns (``chunk``, ``max(dim)``, ``sort``), with named fields if it has them."""

    fields: tuple[str, ...] = ()

    def __new__(cls, items, fields: tuple[str, ...] = ()):
        obj = super().__new__(cls, items)
        obj.fields = tuple(fields)
        return obj

    def field(self, name: str) -> Any:
        return self[self.fields.index(name)]


@dataclass
class Lipschitz:
    """A Lipschitz constant: the proven ``bound``, its power-iteration ``estimate``, and whether every
    factor of ``bound`` is a proven upper bound."""

    bound: float
    estimate: Any  # float, or a differentiable tensor when training
    sound: bool = True
    method: str = "exact"


@dataclass(frozen=True)
class NodeBound:
    """One row of the per-node breakdown.

    ``factor`` is what this node multiplies the Lipschitz constant by (a folded operator's norm
    bound, or an activation's constant); ``lipschitz`` is the resulting bound w.r.t. the input;
    ``seconds`` the time the compiler spent on it (with the folding of the graph nodes before it
    that had no row of their own), so that the rows add up to the evaluation's time.
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
    seconds: float = 0.0


def _walk(obj: Any, into_results: bool = True):
    if isinstance(obj, TupleResult) and not into_results:
        return
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _walk(o, into_results)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _walk(o, into_results)
    elif isinstance(obj, slice):
        yield from _walk((obj.start, obj.stop, obj.step), into_results)
    else:
        yield obj


def has_tracked(obj: Any) -> bool:
    """Whether ``obj`` (possibly nested in tuples, lists, dicts, slices) holds an input-dependent value."""
    return any(isinstance(o, (Tracked, Refused)) for o in _walk(obj))


def find_refused(obj: Any) -> Refused | None:
    """A :class:`Refused` in ``obj``, not looking inside tuple results (indexing picks their parts)."""
    return next((o for o in _walk(obj, into_results=False) if isinstance(o, Refused)), None)
