"""Exceptions raised by certify-fx.

Every error that concerns a graph node names the node, its operation, and the fix (usually a
`certify_fx.transforms` pass), so that a user never has to read a torch.fx traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "CertifyFxError",
    "ConversionOptionError",
    "CheckpointError",
    "DatasetNotFoundError",
    "NotLipschitzError",
    "RecipeError",
    "StaleBoundError",
    "UnprovenBoundError",
    "TraceError",
    "UnsupportedNodeError",
    "did_you_mean",
]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to a mistyped ``word``, else ``""``."""
    choices = [str(c) for c in choices]
    tokens = sorted(str(word).lower().split("_"))
    close = [c for c in choices if sorted(c.lower().split("_")) == tokens]  # lr_min -> min_lr
    close = close or difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CertifyFxError(Exception):
    """Base class of all certify-fx errors."""


class TraceError(CertifyFxError):
    """The model could not be traced with torch.fx."""


class UnsupportedNodeError(CertifyFxError, ValueError):
    """A node whose Lipschitz behaviour the bound compiler does not know.

    The compiler fails closed: an unknown operation is never assumed to be 1-Lipschitz.
    """

    def __init__(self, node: str, op: str, reason: str, fix: str | None = None) -> None:
        self.node, self.op, self.reason, self.fix = node, op, reason, fix
        message = f"node '{node}' ({op}): {reason}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)


class ConversionOptionError(CertifyFxError, ValueError):
    """An unknown conversion target, pass or option, or a value an option does not allow."""


class NotLipschitzError(UnsupportedNodeError):
    """A node that is not globally Lipschitz (softmax attention, LayerNorm, training-mode BatchNorm, ...)."""


class RecipeError(CertifyFxError, ValueError):
    """A training recipe is malformed: an unknown key, a wrong type, an invalid value."""


class DatasetNotFoundError(CertifyFxError, FileNotFoundError):
    """A dataset is not on disk where it was expected (certify-fx never downloads)."""


class CheckpointError(CertifyFxError):
    """A checkpoint is missing, truncated, corrupt, or not a certify-fx training checkpoint."""


class StaleBoundError(CertifyFxError, ValueError):
    """A bound is used for another model than it was proven for: other weights, another structure,
    or another input shape."""


class UnprovenBoundError(CertifyFxError, ValueError):
    """A bound some factor of which is not proven (an estimate, or NaN/inf): it certifies nothing."""
