"""Certified-accuracy curves (needs the optional ``matplotlib``: ``pip install 'certify-fx[plot]'``)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from typing import Sequence

import torch

from .errors import CertifyFxError

__all__ = ["plot_certification_gap", "plot_certified_accuracy", "plot_vra_curves", "require_matplotlib"]


def require_matplotlib() -> None:
    """Fail early, with the install command, when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise CertifyFxError("plotting needs matplotlib, an optional dependency: pip install 'certify-fx[plot]'")


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: str | Path, title: str) -> Path:
    ax.set_xlabel("l2 radius")
    ax.set_ylim(0, 1)
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def plot_certification_gap(vra: dict[float, float], empirical: dict[float, float], path: str | Path,
                           title: str = "") -> Path:
    """Draw VRA (a lower bound on robust accuracy) and empirical robust accuracy under attack (an
    upper bound) against the radius: the space between them is the certification gap."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(empirical), list(empirical.values()), marker="o", label="empirical robust accuracy (attacks)")
    ax.plot(list(vra), list(vra.values()), marker="o", label="VRA (certified)")
    ax.fill_between(list(vra), list(vra.values()), list(empirical.values()), alpha=0.15)
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, ax, path, title)


def plot_certified_accuracy(radii: torch.Tensor, path: str | Path, eps: Sequence[float] = (),
                            title: str = "") -> Path:
    """Draw certified accuracy against the l2 radius (the fraction of points whose certified radius
    exceeds it; a wrong prediction counts as radius 0), with ``eps`` marked, to a PNG."""
    plt = _pyplot()
    finite = radii[torch.isfinite(radii)]
    top = max(max(eps, default=0.0) * 2, float(finite.max()) if len(finite) else 0.0, 1e-3)
    grid = torch.linspace(0, top, 400)
    curve = [(radii > r).float().mean().item() for r in grid]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(grid.numpy(), curve, label="certified accuracy")
    for e in eps:
        ax.axvline(e, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("certified accuracy")
    return _save(fig, ax, path, title)


def plot_vra_curves(curves: dict[str, dict[float, float]], path: str | Path, title: str = "") -> Path:
    """Draw one VRA-against-radius curve per run (``name -> {eps: vra}``, radius 0 = clean accuracy)
    on one set of axes, to compare runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, vra in curves.items():
        radii = sorted(vra)
        ax.plot(radii, [vra[r] for r in radii], label=name)
    ax.set_ylabel("VRA (certified accuracy)")
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, ax, path, title)
