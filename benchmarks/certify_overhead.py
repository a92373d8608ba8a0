"""Certification overhead: time(certify with a precomputed bound) / time(plain forward).

A GloRo certificate costs one forward pass plus an (N x m) comparison, so the ratio should sit
at ~1.0 (target <= 1.05). Both are timed side by side in one run, interleaved, on the same batch.

    python benchmarks/certify_overhead.py [--width 64] [--depth 12] [--batch 256] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import certify_fx as cfx
from certify_fx.models import LiResNet
from timing import interleaved_medians, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LiResNet(num_classes=10, depth=args.depth, width=args.width, img_size=32).eval().to(device)
    x = torch.rand(args.batch, 3, 32, 32, device=device)

    start = time.perf_counter()
    bound = cfx.bound(model, (3, 32, 32), estimate_steps=0)
    bound_seconds = time.perf_counter() - start

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def certify() -> None:
        cfx.certify(model, x, eps=36 / 255, bound=bound)

    times = interleaved_medians({"forward": forward, "certify": certify}, args.repeats, device)
    fwd, cert = median(times["forward"]), median(times["certify"])
    table = Table(title=f"certify() overhead: LiResNet L{args.depth}W{args.width}, 3x32x32, batch {args.batch}, "
                        f"{device.type}, {torch.get_num_threads()} threads")
    for col in ("plain forward (s)", "certify (s)", "ratio", "target", "bound, once (s)"):
        table.add_column(col, justify="right")
    table.add_row(f"{fwd:.4f}", f"{cert:.4f}", f"{cert / fwd:.3f}", "<= 1.05", f"{bound_seconds:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
