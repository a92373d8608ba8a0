"""The rewrite log every pass appends to: what changed, where, and whether the function did."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.fx as fx

__all__ = ["Rewrite", "rewrite_log", "log_rewrite"]


@dataclass(frozen=True)
class Rewrite:
    """One rewrite: ``pass_name`` replaced ``before`` at ``node`` by ``after``.

    ``changes_function`` is False for exact rewrites (outputs equal up to float round-off).
    ``replacement`` names the module that now computes what ``node`` computed in the source, where
    one does (calibration fits it to the source's value there).
    """

    pass_name: str
    node: str
    before: str
    after: str
    changes_function: bool
    replacement: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def rewrite_log(gm: fx.GraphModule) -> list[Rewrite]:
    """The log attached to ``gm`` (created empty on first use)."""
    log = getattr(gm, "rewrite_log", None)
    if log is None:
        log = []
        gm.rewrite_log = log
    return log


def log_rewrite(gm: fx.GraphModule, pass_name: str, node: str, before: str, after: str, changes_function: bool,
                replacement: str = "") -> None:
    rewrite_log(gm).append(Rewrite(pass_name, node, before, after, changes_function, replacement))
