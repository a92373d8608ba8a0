"""Finding training runs under a folder and summarising each (``certify-fx runs``).

Only ``recipe.yaml`` and ``log.jsonl`` are read (no checkpoint is opened), so listing many runs
is instant.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .run_dir import LOG_NAME, RECIPE_NAME, RunDir

__all__ = ["RunSummary", "find_runs"]


@dataclass(frozen=True)
class RunSummary:
    """One run: what it trains and its best verified robust accuracy so far."""

    path: str
    model: str
    data: str
    loss: str
    epochs_done: int
    epochs: int
    eps: float | None  #: the radius ``best_vra`` is measured at (the recipe's eps)
    best_vra: float | None
    best_epoch: int | None
    clean_accuracy: float | None  #: at the best epoch
    has_checkpoint: bool
    modified: str  #: last write of the log, ISO 8601

    @property
    def complete(self) -> bool:
        return self.epochs_done >= self.epochs

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def _summarise(run: RunDir) -> RunSummary | None:
    try:
        recipe = yaml.safe_load(run.recipe.read_text()) if run.recipe.exists() else {}
        history = run.read_history()
    except (yaml.YAMLError, json.JSONDecodeError, OSError):
        return None  # not a readable run: skip it rather than fail the listing
    recipe = recipe if isinstance(recipe, dict) else {}
    section = lambda key: recipe.get(key) if isinstance(recipe.get(key), dict) else {}  # noqa: E731
    eps = section("eps").get("eps")
    key = str(float(eps)) if eps is not None else None
    scored = [m for m in history if key is not None and key in m.get("vra", {})]
    best = max(scored, key=lambda m: m["vra"][key], default=None)
    log = run.log if run.log.exists() else run.checkpoint
    return RunSummary(
        path=str(run.path), model=str(section("model").get("name", "?")), data=str(section("data").get("name", "?")),
        loss=str(section("loss").get("name", "?")), epochs_done=len(history), epochs=int(recipe.get("epochs", 0)),
        eps=float(eps) if eps is not None else None, best_vra=best["vra"][key] if best else None,
        best_epoch=best["epoch"] if best else None, clean_accuracy=best.get("clean_accuracy") if best else None,
        has_checkpoint=run.checkpoint.exists(),
        modified=datetime.fromtimestamp(log.stat().st_mtime).isoformat(timespec="seconds") if log.exists() else "")


def find_runs(root: str | Path) -> list[RunSummary]:
    """Every run under ``root`` (a folder with ``log.jsonl`` or ``recipe.yaml``), sorted by path."""
    root = Path(root)
    folders = {p.parent for name in (LOG_NAME, RECIPE_NAME) for p in root.rglob(name)}
    runs = (_summarise(RunDir(folder)) for folder in sorted(folders))
    return [r for r in runs if r is not None]
