"""SOC training step with exact vs the paper's faster kernel gradients (Singla & Feizi, 2022, Sec. 4).

A stack of SOC + MinMax layers, forward and backward of a random linear loss, timed alternately
in one run; the table prints median seconds per step and the ratio.

    python benchmarks/soc_gradients.py [--layers 5] [--channels 32] [--size 16] [--batch 64] [--terms 6]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from certify_fx.nn import SOC, MinMax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, median  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--terms", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    exact = nn.Sequential(*(m for _ in range(args.layers)
                            for m in (SOC(args.channels, args.channels, train_terms=args.terms), MinMax())))
    exact = exact.to(device).train()
    fast = copy.deepcopy(exact)
    for layer in fast:
        if isinstance(layer, SOC):
            layer.fast_gradients = True
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    target = torch.randn_like(x)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            (model(x) * target).sum().backward()
        return run

    times = interleaved_medians({"exact": step(exact), "fast": step(fast)}, args.repeats, device)
    table = Table(title=f"SOC train step: {args.layers} layers, {args.channels} channels, {args.size}x{args.size}, "
                        f"batch {args.batch}, {args.terms} terms, {device.type}")
    for col in ("kernel gradient", "seconds / step", "ratio to exact"):
        table.add_column(col, justify="right")
    base = median(times["exact"])
    for name in ("exact", "fast"):
        table.add_row(name, f"{median(times[name]):.4f}", f"{median(times[name]) / base:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
