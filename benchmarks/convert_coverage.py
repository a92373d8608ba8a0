"""Which timm families convert, which do not, and why: writes docs/coverage.md.

For one representative model per family (random weights, no download) this runs
``certify_fx.convert`` with the family's target and ``certify_fx.bound`` on the result, and
records success, the bound's soundness and size before and after the ``rescale_layers`` pass
(the last pass of every pipeline), whether the converted logits depend on the input, the time,
or the error that names the node and operation that stopped it.

    python benchmarks/convert_coverage.py [--out docs/coverage.md] [--only resnet18,vit_tiny_patch16_224]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table

import certify_fx as cfx
from certify_fx.transforms import rescale_layers

# (family, model, target, input size or None for the model's default)
FAMILIES = [
    ("ResNet (basic)", "resnet18", "liresnet", (3, 32, 32)),
    ("ResNet (bottleneck)", "resnet50", "liresnet", (3, 32, 32)),
    ("ResNet-D", "resnet26d", "liresnet", (3, 32, 32)),
    ("Wide ResNet", "wide_resnet50_2", "liresnet", (3, 32, 32)),
    ("ResNet v2 (pre-activation)", "resnetv2_50", "liresnet", (3, 32, 32)),
    ("ResNeXt (grouped conv)", "resnext26ts", "liresnet", (3, 32, 32)),
    ("SE-ResNet", "seresnet50", "liresnet", (3, 32, 32)),
    ("VGG", "vgg11", "lipschitz", (3, 32, 32)),
    ("DenseNet", "densenet121", "lipschitz", (3, 32, 32)),
    ("EfficientNet", "efficientnet_b0", "liresnet", (3, 32, 32)),
    ("MobileNetV3", "mobilenetv3_small_100", "liresnet", (3, 32, 32)),
    ("RegNet", "regnetx_002", "liresnet", (3, 32, 32)),
    ("ConvNeXt", "convnext_atto", "liresnet", (3, 32, 32)),
    ("ViT", "vit_tiny_patch16_224", "lipschitz-vit", None),
    ("DeiT", "deit_tiny_patch16_224", "lipschitz-vit", None),
    ("MLP-Mixer", "mixer_s16_224", "lipschitz-vit", None),
    ("ResMLP", "resmlp_12_224", "lipschitz-vit", None),
    ("Swin", "swin_tiny_patch4_window7_224", "lipschitz-vit", None),
    ("CaiT", "cait_xxs24_224", "lipschitz-vit", None),
]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) < 220 else text[:217] + "..."


def run_one(name: str, target: str, size) -> dict:
    row = {"model": name, "target": target}
    start = time.perf_counter()
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        shape = size or tuple(model.pretrained_cfg["input_size"])
        row["input"] = "x".join(map(str, shape))
        converted = cfx.convert(model, to=target, input_shape=shape, rescale=False)
        before = cfx.bound(converted, shape, estimate_steps=0)
        converted = rescale_layers(converted, shape)
        row["rewrites"] = len(converted.rewrite_log)
        result = cfx.bound(converted, shape, estimate_steps=0)
        with torch.no_grad():
            logits = converted(torch.rand(4, *shape))
        row.update(status="converts", sound=result.sound, k_before=f"{before.max_margin:.3g}",
                   max_k=f"{result.max_margin:.3g}", depends=bool((logits - logits[0]).abs().max() > 0))
    except Exception as exc:  # the table records why, whatever it was
        row.update(status="fails", why=f"{type(exc).__name__}: {first_line(exc)}")
    row["seconds"] = f"{time.perf_counter() - start:.0f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/coverage.md")
    parser.add_argument("--only", default=None, help="comma-separated model names")
    args = parser.parse_args()
    os.environ["CERTIFY_FX_CACHE"] = "off"  # the seconds are first proofs, not norms read back from earlier runs
    torch.manual_seed(0)
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    console = Console()
    for family, name, target, size in FAMILIES:
        if wanted and name not in wanted:
            continue
        with console.status(f"{name} -> {target}"):
            row = run_one(name, target, size)
        row["family"] = family
        rows.append(row)
        console.print(f"{name}: {row['status']} ({row['seconds']} s) {row.get('why', '')}")
        write_markdown(rows, args.out)  # after every model, so an interrupted run still leaves a table

    table = Table(title="timm conversion coverage")
    for col in ("family", "model", "target", "status", "sound", "K before rescale", "max K", "input-dependent",
                "s", "why not"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["family"], r["model"], r["target"], r["status"], str(r.get("sound", "")),
                      r.get("k_before", ""), r.get("max_k", ""), str(r.get("depends", "")), r["seconds"],
                      r.get("why", ""))
    console.print(table)
    write_markdown(rows, args.out)
    console.print(f"wrote {args.out}")


def write_markdown(rows: list[dict], out: str) -> None:
    lines = [
        "# Conversion coverage",
        "",
        "Generated by `python benchmarks/convert_coverage.py` (do not edit by hand): one representative",
        f"timm model per family, random weights, converted and bounded on CPU (timm {timm.__version__},",
        f"torch {torch.__version__.split('+')[0]}, certify-fx {cfx.__version__}).",
        "",
        "`K before` is the converted model's bound without the final `rescale_layers` pass, `max K` with it;",
        "`input-dependent`: the converted logits differ between random inputs.",
        "",
        "| family | model | target | input | result | sound | K before | max K | input-dependent | seconds | why not |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        why = r.get("why", "").replace("|", "\\|")
        lines.append(f"| {r['family']} | `{r['model']}` | {r['target']} | {r.get('input', '')} | {r['status']} | "
                     f"{r.get('sound', '')} | {r.get('k_before', '')} | {r.get('max_k', '')} | {r.get('depends', '')} | "
                     f"{r['seconds']} | {why} |")
    lines += [
        "",
        "What stops a family, and what would fix it (see the `why not` column for the exact node):",
        "",
        "- **squeeze-excitation gates** (SE-ResNet, EfficientNet, MobileNetV3) convert: the `replace_gates`",
        "  pass turns `x * sigmoid(g(x))` into a learned per-channel scale initialised from the gate's mean.",
        "- **timm leaf modules without a rule** (VGG's `ConvMlp`): register a rule or trace through them.",
        "- **window attention** (Swin) folds windows into the batch dimension, which the compiler rejects;",
        "  CaiT's class attention (talking heads) likewise; they stay refused with the node named.",
        "- **dense connectivity** (DenseNet) converts, but concatenation is bounded with `sqrt(sum K^2)` per",
        "  source, which compounds over many layers: rescaling each layer to norm 1 cannot undo that",
        "  (see K before / after); a per-block budget (dense layers scaled by 1/sqrt(depth)) is future work.",
        "- **zero-initialised heads** (timm's MLP-Mixer at random init: K = 0, constant logits) are",
        "  re-initialised by `rescale_layers`, so the converted model starts input-dependent.",
    ]
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
