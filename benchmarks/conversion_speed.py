"""Does a converted model train at its source's speed? One train step of the converted model (GloRo +
EMMA, one power-iteration step) over one cross-entropy step of its source, side by side in one run.

Rows: the source's CE step (the reference), the converted model's EMMA step in each block form
(``bottleneck="auto"``: a basic block's two 3x3 convs kept as two convs; ``"composed"``: one 5x5
conv), and what the EMMA step is made of (the CE step of the converted model alone, and the
differentiable margin estimate K alone). Same batch, same optimiser (Lookahead NAdam), interleaved
repeats, medians (target: converted EMMA / source CE <= 1.5).

    python benchmarks/conversion_speed.py [--model resnet18] [--batch 128] [--size 28] [--chans 1]
"""

from __future__ import annotations

import argparse

import timm
import torch
from rich.console import Console
from rich.table import Table
from timm.optim import create_optimizer_v2

import certify_fx as cfx
from certify_fx.losses import cross_entropy, emma
from timing import interleaved_medians, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--chans", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--forms", default="auto,composed")
    args = parser.parse_args()

    torch.manual_seed(0)
    shape = (args.chans, args.size, args.size)
    source = timm.create_model(args.model, num_classes=10, in_chans=args.chans)
    x = torch.rand(args.batch, *shape)
    y = torch.randint(10, (args.batch,))
    eps = 36 / 255

    def step_fn(model, optimizer, loss_of):
        def step() -> None:
            loss = loss_of(model(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    steps = {"source, cross-entropy": step_fn(source.train(), create_optimizer_v2(source, "lookahead_nadam", lr=1e-4),
                                              lambda logits: cross_entropy(logits, y))}
    params = {"source, cross-entropy": sum(p.numel() for p in source.parameters())}
    for form in args.forms.split(","):
        converted = cfx.convert(source.eval(), "liresnet", input_shape=shape, bottleneck=form).train()
        gloro = cfx.GloRo(converted, eps, shape, power_steps=1).train()
        optimizer = create_optimizer_v2(converted, "lookahead_nadam", lr=1e-4)
        steps[f"converted ({form}), EMMA"] = step_fn(converted, optimizer,
                                                     lambda logits, g=gloro: emma(logits, y, g.margin(), eps))
        steps[f"  converted ({form}), cross-entropy only"] = step_fn(converted, optimizer,
                                                                    lambda logits: cross_entropy(logits, y))

        def margin_only(g=gloro, o=optimizer) -> None:
            o.zero_grad(set_to_none=True)
            g.margin().sum().backward()

        steps[f"  converted ({form}), K estimate only"] = margin_only
        count = sum(p.numel() for p in converted.parameters())
        for name in (f"converted ({form}), EMMA", f"  converted ({form}), cross-entropy only",
                     f"  converted ({form}), K estimate only"):
            params[name] = count
    times = interleaved_medians(steps, args.repeats, torch.device("cpu"))
    reference = median(times["source, cross-entropy"])
    table = Table(title=f"train step, {args.model} {args.chans}x{args.size}x{args.size}, batch {args.batch}, cpu, "
                        f"{torch.get_num_threads()} threads")
    for column in ("step", "parameters", "median ms", "/ source CE step"):
        table.add_column(column, justify="right")
    for name, values in times.items():
        table.add_row(name, f"{params[name] / 1e6:.2f}M", f"{median(values) * 1e3:.0f}",
                      f"{median(values) / reference:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
