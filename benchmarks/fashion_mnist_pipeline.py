"""Train what you convert, on Fashion-MNIST: the pipeline table of docs/pipeline.md.

Runs (each a `certify-fx train` of a recipe in recipes/, skipped when its run already finished, so
the script resumes where it stopped):

* timm resnet18 trained with cross-entropy (the model people already have), then converted to a
  LiResNet and fine-tuned with EMMA; the same conversion from random weights; the zoo LiResNet
  from scratch;
* the same for a small timm ViT (lipschitz-vit conversion).

For the converted runs the converted model is also certified *before* fine-tuning. The table
gives clean accuracy and VRA at eps 0.1 / 36/255 / 0.3 and the minutes each run took.

    python benchmarks/fashion_mnist_pipeline.py [--epochs-scale 1.0] [--runs-dir runs/pipeline]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
EPS = ("0.1", "0.1412", "0.3")

# name, recipe, overrides (output_dir is added), source run whose checkpoint is converted
RUNS = [
    ("resnet18 CE", "fashion_mnist_resnet18_ce.yaml", [], None),
    ("resnet18 CE -> LiResNet + EMMA + distillation", "fashion_mnist_resnet18_liresnet.yaml", [], "resnet18 CE"),
    ("resnet18 random -> LiResNet + EMMA", "fashion_mnist_resnet18_liresnet.yaml", ["model.checkpoint=null"], None),
    ("zoo LiResNet (liresnet_l6w32) + EMMA, 4 epochs", "fashion_mnist.yaml", ["epochs=4"], None),
    ("ViT CE", "fashion_mnist_vit_ce.yaml", [], None),
    ("ViT CE -> Lipschitz ViT + EMMA + distillation", "fashion_mnist_vit_lipschitz.yaml", [], "ViT CE"),
    ("ViT random -> Lipschitz ViT + EMMA", "fashion_mnist_vit_lipschitz.yaml", ["model.checkpoint=null"], None),
]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _before_fine_tuning(recipe_path: Path, overrides: list[str]) -> dict:
    """Clean accuracy and VRA of the converted model before any fine-tuning, as the recipe builds
    it and, with source weights, calibrated to the source on 2048 training images."""
    from torch.utils.data import DataLoader

    from certify_fx import bound, evaluate_certified
    from certify_fx.recipe import recipe_dataset_info
    from certify_fx.train import build_model, build_split, load_recipe

    def measure(extra: list[str]) -> dict:
        recipe = load_recipe(recipe_path, overrides + extra)
        model = build_model(recipe).eval()
        b = bound(model, recipe_dataset_info(recipe).input_shape, estimate_steps=0)
        test = DataLoader(build_split(recipe, "test"), batch_size=recipe.data.eval_batch_size)
        result = evaluate_certified(model, test, [float(e) for e in EPS], "lipschitz", b)
        return {"clean_accuracy": result.clean_accuracy, "vra": {e: v for e, v in zip(EPS, result.vra.values())},
                "K": b.margin.max().item()}

    before = measure([])
    if load_recipe(recipe_path, overrides).model.checkpoint:
        before["calibrated"] = measure(["model.calibration=2048"])
    return before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs/pipeline")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--only", default=None, help="comma-separated run numbers (1-based)")
    args = parser.parse_args()
    console = Console()
    runs_dir = Path(args.runs_dir)
    dirs = {name: runs_dir / _slug(name) for name, *_ in RUNS}
    rows = []
    chosen = {int(i) for i in args.only.split(",")} if args.only else set(range(1, len(RUNS) + 1))
    for index, (name, recipe, overrides, source) in enumerate(RUNS, 1):
        out = dirs[name]
        overrides = [*overrides, f"output_dir={out}"]
        if source is not None:
            overrides.append(f"model.checkpoint={dirs[source] / 'checkpoint.pt'}")
        if args.epochs:
            overrides.append(f"epochs={args.epochs}")
        log = out / "log.jsonl"
        before_path = out / "before_fine_tuning.json"
        if index in chosen and "convert" in (ROOT / "recipes" / recipe).read_text() and not before_path.exists():
            out.mkdir(parents=True, exist_ok=True)
            before = _before_fine_tuning(ROOT / "recipes" / recipe, overrides)
            before_path.write_text(json.dumps(before))
        if index in chosen and not (out / "done").exists():
            start = time.perf_counter()
            command = [sys.executable, "-m", "certify_fx", "train", str(ROOT / "recipes" / recipe)]
            command += [a for o in overrides for a in ("--set", o)]
            console.print(f"[bold]{index}. {name}[/]: {' '.join(command[3:])}")
            subprocess.run(command, check=True)
            (out / "done").write_text(f"{time.perf_counter() - start:.0f}\n")
        if not log.exists():
            continue
        last = [json.loads(line) for line in log.read_text().splitlines()][-1]
        before = json.loads(before_path.read_text()) if before_path.exists() else None
        minutes = float((out / "done").read_text()) / 60 if (out / "done").exists() else float("nan")
        rows.append((name, before, last, minutes))
    table = Table(title="Fashion-MNIST: train what you convert (10k test images, proven bound)")
    for col in ("run", "before fine-tuning: clean / VRA@0.1", "calibrated: clean", "clean", *(f"VRA@{e}" for e in EPS),
                "K", "minutes"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, before, last, minutes in rows:
        b = f"{before['clean_accuracy']:.3f} / {before['vra']['0.1']:.3f}" if before else ""
        calibrated = f"{before['calibrated']['clean_accuracy']:.3f}" if before and "calibrated" in before else ""
        vra = [f"{v:.3f}" for v in last.get("vra", {}).values()]
        table.add_row(name, b, calibrated, f"{last['clean_accuracy']:.3f}", *vra,
                      f"{last.get('K', float('nan')):.3g}", f"{minutes:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
