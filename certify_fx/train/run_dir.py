"""A run directory: the files one training run owns, guarded so that no run overwrites another.

A folder *holds a run* when it has a checkpoint, a metrics log or a summary. Starting a run there
is refused unless the run is being resumed from that folder or the caller asked to overwrite
(which removes only the run's own files). Logs are rewritten atomically after every epoch:
``log.jsonl`` (one JSON record per epoch), ``summary.csv`` (timm's convention: one row per epoch)
and, when ``tensorboard`` is installed, TensorBoard scalars under ``tensorboard/``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..files import atomic_write_text

__all__ = ["CHECKPOINT_NAME", "LOG_NAME", "RECIPE_NAME", "SUMMARY_NAME", "RunDir", "summary_rows"]

CHECKPOINT_NAME, LOG_NAME, RECIPE_NAME, SUMMARY_NAME = "checkpoint.pt", "log.jsonl", "recipe.yaml", "summary.csv"
TENSORBOARD_DIR = "tensorboard"
#: Files whose presence means the folder holds a run's results.
RESULT_FILES = (CHECKPOINT_NAME, LOG_NAME, SUMMARY_NAME)


@dataclass(frozen=True)
class RunDir:
    """The folder of one run and the names of its files."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def log(self) -> Path:
        return self.path / LOG_NAME

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_NAME

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE_NAME

    def results(self) -> list[str]:
        """Names of the non-empty result files present (none: the folder holds no run)."""
        return [name for name in RESULT_FILES if (self.path / name).is_file() and (self.path / name).stat().st_size]

    def claim(self, overwrite: bool = False, resuming_here: bool = False) -> None:
        """Make the folder this run's, or refuse with an error that says how to proceed.

        Args:
            overwrite: remove an earlier run's files (and only those) instead of refusing.
            resuming_here: the run continues the checkpoint in this folder; its files are its own.
        """
        found = self.results()
        if found and not resuming_here:
            if not overwrite:
                hint = (f"continue it with --resume {self.checkpoint}, " if self.checkpoint.exists() else "")
                raise RecipeError(
                    f"output_dir {self.path} already holds a run ({', '.join(found)}); {hint}write elsewhere "
                    "with --set output_dir=DIR, or replace it with --overwrite")
            for name in (*RESULT_FILES, RECIPE_NAME):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / TENSORBOARD_DIR, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_logs(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``log.jsonl`` and ``summary.csv`` from the metrics history."""
        atomic_write_text("".join(json.dumps(m) + "\n" for m in history), self.log)
        rows = summary_rows(history)
        if rows:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(buffer.getvalue(), self.summary)

    def read_history(self) -> list[dict[str, Any]]:
        """The per-epoch records of ``log.jsonl`` (empty if there is none)."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


def summary_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per epoch: scalars as they are, ``vra`` expanded to ``vra@EPS`` columns."""
    eps = sorted({e for m in history for e in m.get("vra", {})}, key=float)
    scalars = [k for k in ("epoch", "loss", "train_accuracy", "clean_accuracy", "K", "K_estimate", "eps_train",
                           "lr", "seconds") if any(k in m for m in history)]
    return [{**{k: m.get(k, "") for k in scalars}, **{f"vra@{e}": m.get("vra", {}).get(e, "") for e in eps}}
            for m in history]


class TensorBoardScalars:
    """Per-epoch scalars for TensorBoard, when the ``tensorboard`` package is installed (else a no-op)."""

    def __init__(self, run: RunDir) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: pip install 'certify-fx[tensorboard]'
            self.writer = None
        else:
            self.writer = SummaryWriter(str(run.path / TENSORBOARD_DIR))

    def add_epoch(self, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(metrics["epoch"])
        for key, value in summary_rows([metrics])[0].items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key.replace("@", "/"), value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
