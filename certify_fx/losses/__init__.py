"""GloRo training losses, all with one signature.

``loss(logits, labels, margin, eps, **options) -> scalar``: ``logits`` (N, m), ``labels`` (N,),
``margin`` the differentiable (m, m) margin Lipschitz matrix ``K`` (power-iteration estimate during
training), ``eps`` the training radius. Every loss is vectorised over classes (Gram-matrix ``K``,
gathers and scatters; no Python loop over classes) and selects classes by *index*.

>>> from certify_fx.losses import create_loss
>>> loss_fn = create_loss("emma")
>>> loss = loss_fn(logits, y, margin, eps=36 / 255)
"""

from __future__ import annotations

import inspect
import typing
from functools import partial
from typing import Any, Callable, Protocol

import torch

from .cll import calibrated_sigma, cll
from .crc_lip import crc_lip, curvature_penalty
from .cross_entropy import cross_entropy
from .distill import distillation
from .emma import emma
from .gloro import GloRo, bottom_logit, gloro_ce, gloro_logits, trades
from .logit_annealing import logit_annealing

__all__ = [
    "CONTEXT_ARGUMENTS",
    "GloRo",
    "LOSSES",
    "MARGIN_FREE_LOSSES",
    "Loss",
    "bottom_logit",
    "calibrated_sigma",
    "cll",
    "crc_lip",
    "create_loss",
    "cross_entropy",
    "curvature_penalty",
    "distillation",
    "emma",
    "gloro_ce",
    "gloro_logits",
    "logit_annealing",
    "loss_options",
    "needs_features",
    "trades",
]


class Loss(Protocol):
    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor, eps: float,
                 **options: Any) -> torch.Tensor: ...


#: Loss name -> function; ``create_loss`` binds options, recipes name them.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": cross_entropy,
    "gloro_ce": gloro_ce,
    "trades": trades,
    "emma": emma,
    "la": logit_annealing,
    "cll": cll,
    "crc_lip": crc_lip,
}

#: Losses that ignore the margin matrix: training them needs no Lipschitz bound (plain baselines).
MARGIN_FREE_LOSSES = frozenset({"ce", "crc_lip"})

#: Keyword arguments the trainer supplies (not recipe options): a loss that declares ``features``
#: gets the classifier's input and ``head`` the classifier (CRC-Lip trains on the head's input).
CONTEXT_ARGUMENTS = frozenset({"features", "head"})


def loss_options(name: str) -> dict[str, Any]:
    """The options loss ``name`` takes (every parameter after ``logits, labels, margin, eps``),
    mapped to their type annotation."""
    fn = LOSSES[name]
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())[4:]
    return {p.name: hints.get(p.name, Any) for p in params
            if p.kind is not p.VAR_KEYWORD and p.name not in CONTEXT_ARGUMENTS}


def needs_features(name: str) -> bool:
    """Whether loss ``name`` trains on the classifier's input (it declares ``features``)."""
    return "features" in inspect.signature(LOSSES[name]).parameters


def create_loss(name: str, **options: Any) -> Loss:
    """The loss ``name`` with ``options`` bound (e.g. ``create_loss("cll", p=0.01, lam=1e-5)``)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    return partial(LOSSES[name], **options) if options else LOSSES[name]
