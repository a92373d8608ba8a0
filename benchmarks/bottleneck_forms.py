"""Converting a bottleneck ResNet: composed vs factored LiResNet blocks, side by side in one run.

For each form (``convert(..., bottleneck="composed" | "factored")``) the table gives the parameter
count, the convert time, the bound time (both sound bounds are equal: the compiler folds the
factored branch exactly), the time of a training step (forward + backward of a batch) and each
time as a ratio to the unconverted model's forward pass on the same batch.

    python benchmarks/bottleneck_forms.py [--model resnet50] [--size 224] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from rich.console import Console
from rich.table import Table

import certify_fx as cfx
from timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    source = timm.create_model(args.model, num_classes=1000).eval()
    x = torch.rand(args.batch, *shape)
    rows, models = {}, {}
    for form in ("composed", "factored"):
        start = time.perf_counter()
        model = cfx.convert(source, to="liresnet", input_shape=shape, bottleneck=form)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        bound = cfx.bound(model.eval(), shape, estimate_steps=0)
        rows[form] = {"params": sum(p.numel() for p in model.parameters()), "convert": convert_s,
                      "bound": time.perf_counter() - start, "K": bound.margin.max().item()}
        models[form] = model

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        return run

    with torch.no_grad():
        forward = interleaved_medians({"forward": lambda: source(x)}, args.repeats, x.device)["forward"]
    base = statistics.median(forward)
    steps = interleaved_medians({f: step(m.train()) for f, m in models.items()}, args.repeats, x.device)
    table = Table(title=f"{args.model} at {args.size}x{args.size}: LiResNet conversion, composed vs factored "
                        f"bottlenecks (unconverted forward of {args.batch} images: {base:.2f} s)")
    for col in ("form", "parameters", "max K", "convert s", "bound s", "train step s", "convert / fwd",
                "bound / fwd", "step / fwd"):
        table.add_column(col, justify="right")
    table.add_row("unconverted", f"{sum(p.numel() for p in source.parameters()) / 1e6:.1f}M", "", "", "", "", "", "", "")
    for form, r in rows.items():
        s = statistics.median(steps[form])
        table.add_row(form, f"{r['params'] / 1e6:.1f}M", f"{r['K']:.4g}", f"{r['convert']:.1f}", f"{r['bound']:.1f}",
                      f"{s:.2f}", f"{r['convert'] / base:.1f}", f"{r['bound'] / base:.1f}", f"{s / base:.2f}")
    Console().print(table)
    c, f = rows["composed"], rows["factored"]
    Console().print(f"factored / composed: parameters {f['params'] / c['params']:.2f}, bound time "
                    f"{f['bound'] / c['bound']:.2f}, train step {statistics.median(steps['factored']) / statistics.median(steps['composed']):.2f}")


if __name__ == "__main__":
    main()
