"""How long does a proven bound of a converted ResNet take? Convert, then bound, per stage, with the
bound computed side by side in one run two ways on the same weights:

- **before**: every convolution bounded from its full kernel (``reference_bounds()``: the path
  before channel factors, kept Gram matrices and the identity floor existed);
- **after**: the default path, with an empty norm cache;
- **again**: the default path once more in a fresh norm cache that keeps only the directory (as
  ``certify-fx bound`` after ``certify-fx convert``, or certifying at another ``eps``).

The table gives each stage's seconds, the proven max K of each path and their ratio, and the
slowest nodes of the "after" bound with their share of its time. A second table bounds zoo
models before and after (medians of interleaved repeats; their bounds must be no slower).

    python benchmarks/bound_speed.py [--model resnet50] [--size 224] [--skip-before] [--zoo-repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import timm
import torch
from rich.console import Console
from rich.table import Table

import certify_fx as cfx
from certify_fx.bounds import BoundCompiler
from certify_fx.bounds.cache import norm_cache
from certify_fx.bounds.norms import reference_bounds


def timed_bound(model, shape) -> tuple[float, float, cfx.LipschitzBound]:
    """(trace + record seconds, evaluation seconds, bound)."""
    start = time.perf_counter()
    compiler = BoundCompiler(model, shape)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    bound = compiler.sound_bound(estimate_steps=0)
    return traced, time.perf_counter() - start, bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--skip-before", action="store_true", help="skip the reference bound (minutes at 224)")
    parser.add_argument("--power-steps", type=int, default=100, help="power-iteration steps to time for comparison")
    parser.add_argument("--zoo-repeats", type=int, default=3, help="repeats of the zoo table (0 skips it)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    console = Console()
    source = timm.create_model(args.model, num_classes=args.classes).eval()
    start = time.perf_counter()
    model = cfx.convert(source, to="liresnet", input_shape=shape).eval()
    convert_s = time.perf_counter() - start
    console.print(f"converted {args.model} in {convert_s:.1f} s; bounding ({torch.get_num_threads()} threads)")

    rows = {}
    if not args.skip_before:
        os.environ["CERTIFY_FX_CACHE"] = "off"  # nothing kept for the paths after it
        with reference_bounds():
            norm_cache.clear()
            rows["before"] = timed_bound(model, shape)
    os.environ["CERTIFY_FX_CACHE"] = tempfile.mkdtemp(prefix="bound-speed-")  # empty
    norm_cache.clear()
    rows["after"] = timed_bound(model, shape)
    norm_cache.clear()  # a new process: only the directory is left
    rows["again"] = timed_bound(model, shape)
    # what the anchors certify with: power iteration (500 steps per layer), an estimate from below
    compiler = BoundCompiler(model, shape)
    start = time.perf_counter()
    with torch.no_grad():
        estimate = compiler.estimate(steps=args.power_steps).max().item()
    power_s = time.perf_counter() - start

    after_k = rows["after"][2].max_margin
    table = Table(title=f"{args.model} at {args.size}x{args.size} -> LiResNet: convert + proven bound, CPU "
                        f"({torch.get_num_threads()} threads), one run")
    for col in ("bound", "convert s", "trace + record s", "norms + fold s", "convert + bound s", "max K",
                "K / K after", "bound s / after"):
        table.add_column(col, justify="right")
    after_s = rows["after"][0] + rows["after"][1]
    for name, (traced, evaluated, bound) in rows.items():
        table.add_row(name, f"{convert_s:.1f}", f"{traced:.1f}", f"{evaluated:.1f}",
                      f"{convert_s + traced + evaluated:.1f}", f"{bound.max_margin:.10g}",
                      f"{bound.max_margin / after_k:.9f}", f"{(traced + evaluated) / after_s:.2f}")
    console.print(table)
    console.print(f"{args.power_steps} power-iteration steps per operator (the anchors use 500; an estimate from "
                  f"below, not a bound): {power_s:.1f} s after tracing, max K estimate {estimate:.10g} "
                  f"(proven / estimate {after_k / estimate:.6f}; proven 'after' bound / this time "
                  f"{(rows['after'][0] + rows['after'][1]) / power_s:.2f})")
    slow = Table(title="slowest nodes of the 'after' bound")
    for col in ("node", "operation (folded)", "method", "s", "share"):
        slow.add_column(col, justify="right" if col in ("s", "share") else "left")
    after = rows["after"][2]
    for row in after.slowest(8):
        slow.add_row(row.node, row.op[:60], row.method, f"{row.seconds:.1f}", f"{row.seconds / after.seconds:.0%}")
    console.print(slow)
    assert all(b.sound for _, _, b in rows.values())
    if args.zoo_repeats:
        zoo(console, args.zoo_repeats)


#: zoo models as the recipes build them: (name, input shape, timm keyword arguments)
ZOO = [
    ("liresnet_l6w32", (1, 28, 28), {"in_chans": 1, "img_size": 28}),
    ("liresnet_l12w64", (3, 32, 32), {"img_size": 32}),
    ("convnet_6c2f", (3, 32, 32), {}),
    ("lipconvnet_10", (3, 32, 32), {"img_size": 32}),
    ("lipschitz_vit_tiny_patch4", (3, 32, 32), {"img_size": 32}),
]


def zoo(console: Console, repeats: int) -> None:
    """Each zoo model's proven bound, before and after, interleaved, with an empty norm cache."""
    table = Table(title=f"zoo models: proven bound seconds, median of {repeats} interleaved repeats")
    for col in ("model", "input", "before s", "after s", "after / before", "max K before", "max K after"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, shape, kwargs in ZOO:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, **kwargs).eval()
        times, ks = {"before": [], "after": []}, {}
        for _ in range(repeats):
            for path in ("before", "after"):
                norm_cache.clear()
                os.environ["CERTIFY_FX_CACHE"] = "off"
                start = time.perf_counter()
                if path == "before":
                    with reference_bounds():
                        bound = cfx.bound(model, shape, estimate_steps=0)
                else:
                    bound = cfx.bound(model, shape, estimate_steps=0)
                times[path].append(time.perf_counter() - start)
                ks[path] = bound.max_margin
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        table.add_row(name, "x".join(map(str, shape)), f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}",
                      f"{ks['before']:.8g}", f"{ks['after']:.8g}")
    console.print(table)


if __name__ == "__main__":
    main()
