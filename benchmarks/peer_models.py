"""Networks written as the field's code bases write them: what each capture path makes of them.

For each stand-in of ``tests/peer_models.py`` (small, random weights): the outcome of symbolic
tracing alone, of ``capture="auto"`` (torch.fx, else torch.export), the time torch.export takes to
capture it, and the proven ``K`` over its nominal constant (the head's ``||w_i - w_j||`` for a body
that is 1-Lipschitz by construction)::

    python benchmarks/peer_models.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import certify_fx as cfx  # noqa: E402
import peer_models  # noqa: E402
from certify_fx.bounds.capture import export_graph  # noqa: E402


def outcome(model: torch.nn.Module, capture: str) -> tuple[str, cfx.LipschitzBound | None]:
    try:
        return "bounded", cfx.bound(model, peer_models.SHAPE, estimate_steps=0, capture=capture)
    except cfx.TraceError:
        return "trace fails", None
    except cfx.CertifyFxError as exc:
        return f"refused ({str(exc).split('): ')[-1][:40]}...)", None


def main() -> None:
    table = Table(title="peer-style networks: symbolic tracing vs auto (torch.fx, else torch.export)")
    for column in ("network", "symbolic only", "auto", "export capture s", "bound s", "K / nominal (max)"):
        table.add_column(column)
    counts = {"symbolic": 0, "auto": 0}
    names = sorted(peer_models.STAND_INS) + sorted(peer_models.REFUSED)
    for name in names:
        model = peer_models.build(name)
        symbolic, _ = outcome(model, "symbolic")
        start = time.perf_counter()
        auto, bound = outcome(model, "auto")
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        try:
            export_graph(model, peer_models.SHAPE)
            capture_seconds = f"{time.perf_counter() - start:.2f}"
        except cfx.CertifyFxError:
            capture_seconds = "fails"
        ratio = "-"
        if bound is not None and getattr(model, "nominal", None) is not None:
            rows = peer_models.head_rows(model)
            off = ~torch.eye(len(rows), dtype=torch.bool)
            ratio = f"{(bound.margin[off] / (model.nominal * rows[off])).max().item():.4f}"
        counts["symbolic"] += symbolic == "bounded"
        counts["auto"] += auto == "bounded"
        table.add_row(name, symbolic, auto, capture_seconds, f"{seconds:.2f}", ratio)
    console = Console()
    console.print(table)
    console.print(f"bounded: symbolic only {counts['symbolic']} of {len(names)}, auto {counts['auto']} of {len(names)}")


if __name__ == "__main__":
    main()
