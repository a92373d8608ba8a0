"""What the Fashion-MNIST comparison scripts share: train a recipe once, certify its checkpoint once.

Every run is a ``certify-fx train`` of a recipe in ``recipes/`` (with ``--set`` overrides) in its
own folder. A finished run leaves a ``done`` file with its wall-clock seconds and is skipped; an
unfinished one is continued with ``--resume``, so a script stopped at any point (Ctrl-C included)
loses at most the step in flight. Certificates come from ``certify-fx certify --json`` and are
cached next to the checkpoint, keyed by method and radii.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    """One training run: a display name, a recipe file in ``recipes/`` and its overrides."""

    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("lipschitz",)

    @property
    def slug(self) -> str:
        return "_".join("".join(c if c.isalnum() else " " for c in self.name.lower()).split())


def _certify_fx(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "certify_fx", *arguments]


def _run(command: list[str], capture: bool = False, allowed: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run a ``certify-fx`` command. Ctrl-C reaches it (the whole process group gets it) and is its
    to handle: a training run finishes its step and writes a checkpoint. This script only waits
    for it (a Python handler, not SIG_IGN, so the child starts with the default one), then stops
    with a one-line message instead of a traceback."""
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        done = subprocess.run(command, capture_output=capture, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    if done.returncode in (130, -signal.SIGINT):
        raise SystemExit("stopped by Ctrl-C; run the same command again to continue where it stopped")
    if done.returncode not in allowed:
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    return done


def train(console: Console, run: Run, out: Path) -> float:
    """Train ``run`` into ``out`` unless it finished already; its wall-clock minutes."""
    done = out / "done"
    if not done.exists():
        start = time.perf_counter()
        if (out / "checkpoint.pt").exists():
            command = _certify_fx("train", "--resume", str(out / "checkpoint.pt"))
        else:
            overrides = [f"--set={item}" for item in (*run.overrides, f"output_dir={out}")]
            command = _certify_fx("train", str(ROOT / "recipes" / run.recipe), *overrides)
        console.print(f"[bold]{run.name}[/]: certify-fx {' '.join(command[3:])}")
        # An interrupted run keeps its time so far in `elapsed`; the resumed part adds to it.
        elapsed = out / "elapsed"
        try:
            _run(command)
        finally:
            earlier = float(elapsed.read_text()) if elapsed.exists() else 0.0
            out.mkdir(parents=True, exist_ok=True)
            elapsed.write_text(f"{earlier + time.perf_counter() - start:.0f}\n")
        done.write_text(elapsed.read_text())
    return float(done.read_text()) / 60


def script_arguments(description: str, runs_dir: str) -> argparse.ArgumentParser:
    """The options every comparison script takes: where its runs live, and Markdown output."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default=runs_dir)
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    return parser


def trained(console: Console, runs: Sequence[Run], runs_dir: str | Path) -> Iterator[tuple[Run, Path, float]]:
    """Each run trained (or found finished) in its folder under ``runs_dir``, with its minutes."""
    for run in runs:
        out = Path(runs_dir) / run.slug
        yield run, out, train(console, run, out)


def certify(out: Path, method: str, eps: Sequence[float]) -> dict:
    """``certify-fx certify --json`` of ``out/checkpoint.pt`` at ``eps`` (cached)."""
    radii = ",".join(f"{e:.10g}" for e in eps)
    key = hashlib.sha1(radii.encode()).hexdigest()[:8]
    cached = out / f"certify_{method}_{key}.json"
    if not cached.exists():
        command = _certify_fx("certify", str(out / "checkpoint.pt"), "--eps", radii, "--method", method, "--json")
        cached.write_text(_run(command, capture=True).stdout)
    return json.loads(cached.read_text())


def audit(out: Path, eps: Sequence[float], limit: int = 1000) -> dict:
    """``certify-fx audit --json`` of ``out/checkpoint.pt`` on the first ``limit`` test images (cached;
    exit status 1, violations found, is a result too)."""
    radii = ",".join(f"{e:.10g}" for e in eps)
    cached = out / f"audit_{hashlib.sha1(radii.encode()).hexdigest()[:8]}_{limit}.json"
    if not cached.exists():
        command = _certify_fx("audit", str(out / "checkpoint.pt"), "--eps", radii, "--limit", str(limit), "--json")
        cached.write_text(_run(command, capture=True, allowed=(0, 1)).stdout)
    return json.loads(cached.read_text())


def vra_at(result: dict, eps: float) -> float:
    """The VRA of a ``certify --json`` result at ``eps`` (its keys are the radii as printed)."""
    for key, value in result["vra"].items():
        if abs(float(key) - eps) < 1e-9:
            return value
    raise KeyError(f"no VRA at eps={eps} in {sorted(result['vra'])}")


def show(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Print ``rows`` as a rich table; return them as a Markdown table."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
