"""GloRo nets and their losses (Leino et al., 2021): the bottom logit, the training wrapper, and
cross-entropy and TRADES on the bottom-logit-augmented net."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..bounds.capture import configured_input_shape
from ..bounds.compiler import BoundCompiler
from ..bounds.fingerprint import model_fingerprint
from ..bounds.result import LipschitzBound
from ..certificates import certified_radius, check_eps, round_up
from ..errors import CertifyFxError, StaleBoundError

if TYPE_CHECKING:
    from ..progress import ProgressLike

__all__ = ["GloRo", "bottom_logit", "gloro_ce", "gloro_logits", "trades"]


class GloRo(nn.Module):
    """A globally-robust network: the model's m logits plus a bottom logit ``f_bot`` (last).

    ``f_bot(x) = max_{i != j} f_i(x) + eps * K[j, i]`` with ``j`` the predicted class; the GloRo net
    predicts ``j`` only where ``f_j > f_bot``, i.e. where ``j`` is certified at ``eps``.

    In training mode ``K`` is the differentiable power-iteration estimate (``power_steps``
    iterations per forward, iterates persisted); in eval mode it is the proven bound, recomputed
    whenever the weights change (any write, ``.data`` included). A changed structure (a replaced
    submodule, a hook) is traced again; :meth:`predict` always certifies with the proven bound.

    Args:
        model: the classifier.
        eps: the certification radius.
        input_shape: one input's shape (without batch); taken from a timm model's config if
            omitted, else from the first batch.
        power_steps: power-iteration steps per training forward.
    """

    def __init__(self, model: nn.Module, eps: float, input_shape: tuple[int, ...] | None = None,
                 power_steps: int = 1) -> None:
        super().__init__()
        self.model, self.eps, self.power_steps = model, check_eps(eps), power_steps
        self._compiler: BoundCompiler | None = None
        self._cached: tuple[object, LipschitzBound] | None = None
        shape = tuple(input_shape) if input_shape is not None else configured_input_shape(model)
        if shape is not None:
            self._compile(shape)

    def _compile(self, shape: tuple[int, ...]) -> BoundCompiler:
        self._compiler = BoundCompiler(self.model, shape)
        self._cached = None
        return self._compiler

    @property
    def compiler(self) -> BoundCompiler:
        """The bound compiler for the model's current structure (its iterates are in ``state_dict``)."""
        return self._compiler_for(model_fingerprint(self.model, weights=False).structure)

    def _compiler_for(self, structure: int) -> BoundCompiler:
        if self._compiler is None:
            raise CertifyFxError("GloRo has no input shape yet: run one forward pass or pass input_shape")
        if structure != self._compiler.structure:
            self._compile(self._compiler.input_shape)
        return self._compiler

    def lipschitz_bound(self, progress: ProgressLike | None = None) -> LipschitzBound:
        """The proven bound for the current weights (cached until they change); ``progress``
        shows the computation node by node."""
        key = model_fingerprint(self.model)
        compiler = self._compiler_for(key.structure)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, compiler.sound_bound(estimate_steps=0, progress=progress))
        return self._cached[1]

    def margin(self) -> torch.Tensor:
        """(m, m) margin constants: differentiable estimate in training, proven bound in eval."""
        if self.training:
            return self.compiler.estimate(steps=self.power_steps)
        return self.lipschitz_bound().margin

    def _check_shape(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape[1:])
        if self._compiler is None:
            self._compile(shape)
        elif shape != self._compiler.input_shape:
            raise StaleBoundError(f"this GloRo net was compiled for inputs of shape {self._compiler.input_shape}, "
                                  f"not {shape}; build a GloRo net for that shape")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(x)
        logits = self.model(x)
        return torch.cat([logits, bottom_logit(logits, self.margin(), self.eps)[:, None]], dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes, with ``m`` (the bottom class) where the prediction is not certified.

        Always certifies with the proven bound, in training mode too.
        """
        self._check_shape(x)
        bound = self.lipschitz_bound()
        if not bound.sound:
            raise CertifyFxError("the Lipschitz bound is not proven for every factor; refusing to certify")
        pred, radius = certified_radius(self.model(x), bound.margin)
        m = bound.num_classes
        return torch.where(radius > self.eps, pred, torch.full_like(pred, m))

    def extra_repr(self) -> str:
        return f"eps={self.eps}, power_steps={self.power_steps}"


def bottom_logit(logits: torch.Tensor, margin: torch.Tensor, eps: float) -> torch.Tensor:
    """``max_{i != j} f_i + eps * K[j, i]`` with ``j = argmax f`` (masked by index)."""
    pred = logits.argmax(dim=1)
    k = round_up(margin, logits.dtype) if margin.dtype == torch.float64 and not margin.requires_grad else margin
    shifted = logits + eps * k.to(logits.device)[pred]
    shifted = shifted.scatter(1, pred[:, None], -torch.inf)
    return shifted.amax(dim=1)




def gloro_logits(logits: torch.Tensor, margin: torch.Tensor, eps: float) -> torch.Tensor:
    """``[f, f_bot]`` (N, m + 1): the GloRo net's output, bottom logit last."""
    return torch.cat([logits, bottom_logit(logits, margin, eps)[:, None]], dim=1)


def gloro_ce(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float) -> torch.Tensor:
    """Cross-entropy of ``[f, f_bot]`` with the label (the bottom class is never the label)."""
    return F.cross_entropy(gloro_logits(logits, margin, eps), labels)


def trades(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float,
           lam: float = 1.0) -> torch.Tensor:
    """``CE(f, y) + lam * CE([f, f_bot], [softmax(f), 0])`` (GloRo Def. 3).

    The second term asks the GloRo net to agree with the clean prediction and to put no mass on
    the bottom class; ``lam`` trades clean accuracy for robustness (recipes may schedule it).
    """
    clean = F.cross_entropy(logits, labels)
    target = F.pad(logits.softmax(dim=1), (0, 1))  # the bottom class gets probability 0
    robust = -(target * gloro_logits(logits, margin, eps).log_softmax(dim=1)).sum(dim=1).mean()
    return clean + lam * robust
