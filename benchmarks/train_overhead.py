"""Training overhead of certified training: time(EMMA step) / time(cross-entropy step).

Both steps train the same LiResNet on the same batch with the same optimiser (Lookahead NAdam):
the CE step is forward + backward + update; the EMMA step adds one power-iteration step per
operator (persisted iterates) and the differentiable margin matrix K feeding the loss. Steps are
interleaved and the medians compared, in one run on one machine (target on CPU: <= 1.15).

    python benchmarks/train_overhead.py [--depth 12] [--width 64] [--batch 128] [--repeats 8]
"""

from __future__ import annotations

import argparse
import torch
from rich.console import Console
from rich.table import Table
from timm.optim import create_optimizer_v2

from certify_fx import GloRo
from certify_fx.losses import cross_entropy, emma
from certify_fx.models import LiResNet
from timing import interleaved_medians, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--power-steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LiResNet(num_classes=10, depth=args.depth, width=args.width, img_size=args.img_size).to(device)
    gloro = GloRo(model, 36 / 255, (3, args.img_size, args.img_size), power_steps=args.power_steps).train()
    optimizer = create_optimizer_v2(model, opt="lookahead_nadam", lr=1e-4)
    x = torch.rand(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(10, (args.batch,), device=device)

    def step(robust: bool) -> None:
        logits = model(x)
        loss = emma(logits, y, gloro.margin(), 36 / 255) if robust else cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def margin_alone() -> None:  # what EMMA adds: power iteration + the K matrix, forward and backward
        optimizer.zero_grad(set_to_none=True)
        gloro.margin().sum().backward()

    times = interleaved_medians({"cross-entropy": lambda: step(False), "EMMA": lambda: step(True),
                                 "margin": margin_alone}, args.repeats, device)
    ce, robust = median(times["cross-entropy"]), median(times["EMMA"])
    table = Table(title=f"training step, LiResNet L{args.depth}W{args.width} {args.img_size}x{args.img_size}, "
                        f"batch {args.batch}, {device.type}, {torch.get_num_threads()} threads")
    for col in ("step", "median ms", "min ms", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("cross-entropy", f"{ce * 1e3:.1f}", f"{min(times['cross-entropy']) * 1e3:.1f}", "1.000")
    table.add_row(f"EMMA ({args.power_steps} power step)", f"{robust * 1e3:.1f}",
                  f"{min(times['EMMA']) * 1e3:.1f}", f"{robust / ce:.3f}")
    k = median(times["margin"])
    table.add_row("  of which K (power iteration)", f"{k * 1e3:.1f}", f"{min(times['margin']) * 1e3:.1f}",
                  f"{k / ce:.3f}")
    Console().print(table)
    print(f"EMMA / cross-entropy step time: {robust / ce:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
