"""What the compiler proves: per-margin Lipschitz constants and how they were obtained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .fingerprint import Fingerprint
from .values import NodeBound, Shape

__all__ = ["LipschitzBound", "FULL_PRECISION"]

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
    def seconds(self) -> float:
        """The time the proof took (the sum over :attr:`nodes`; tracing and recording not included)."""
        return sum(n.seconds for n in self.nodes)

    def slowest(self, count: int = 5) -> list[NodeBound]:
        """The ``count`` rows that took the most time, slowest first."""
        return sorted(self.nodes, key=lambda n: n.seconds, reverse=True)[:count]

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
