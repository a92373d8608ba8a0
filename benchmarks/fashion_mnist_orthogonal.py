"""The two certified families side by side on Fashion-MNIST: the table of docs/orthogonal.md.

Runs (each a `certify-fx train` of a recipe in recipes/, skipped when it already finished, so the
script resumes where it stopped), then certifies each checkpoint on the 10k test images with
`certify-fx certify --json` (cached next to the checkpoint):

* LipConvnet-5 + LLN head (1-Lipschitz by construction; EMMA), Lipschitz certificate;
* LipConvnet-5 + projection pooling + softplus MLP head (crc_lip training), Lipschitz and CRC-Lip
  certificates;
* LiResNet (liresnet_l6w32) + EMMA, the GloRo family, Lipschitz certificate.

The table gives clean accuracy, VRA at eps 0.1 / 36/255 / 0.3 / 0.5, the training minutes, the
bound's seconds and the certification seconds per 10k images of each certificate kind.

    python benchmarks/fashion_mnist_orthogonal.py [--runs-dir runs/orthogonal] [--markdown]
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
EPS = "0.1,0.1411764705882353,0.3,0.5"
EPS_NAMES = ("0.1", "36/255", "0.3", "0.5")

# name, recipe, certificate kinds
RUNS = [
    ("LipConvnet-5 + LLN", "fashion_mnist_lipconvnet_lln.yaml", ("lipschitz",)),
    ("LipConvnet-5 + projection pooling + MLP head", "fashion_mnist_lipconvnet_crc.yaml", ("lipschitz", "crc")),
    ("LiResNet (liresnet_l6w32) + EMMA", "fashion_mnist.yaml", ("lipschitz",)),
]


def _slug(name: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _train(console: Console, name: str, recipe: str, out: Path) -> None:
    start = time.perf_counter()
    command = [sys.executable, "-m", "certify_fx", "train", str(ROOT / "recipes" / recipe), "--set",
               f"output_dir={out}"]
    if (out / "checkpoint.pt").exists():
        command = [sys.executable, "-m", "certify_fx", "train", "--resume", str(out / "checkpoint.pt")]
    console.print(f"[bold]{name}[/]: {' '.join(command[3:])}")
    subprocess.run(command, check=True)
    (out / "done").write_text(f"{time.perf_counter() - start:.0f}\n")


def _certify(out: Path, method: str) -> dict:
    cached = out / f"certify_{method}.json"
    if not cached.exists():
        command = [sys.executable, "-m", "certify_fx", "certify", str(out / "checkpoint.pt"), "--eps", EPS,
                   "--method", method, "--json"]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        cached.write_text(done.stdout)
    return json.loads(cached.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs/orthogonal")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args()
    console = Console()
    rows = []
    for name, recipe, methods in RUNS:
        out = Path(args.runs_dir) / _slug(name)
        if not (out / "done").exists():
            _train(console, name, recipe, out)
        minutes = float((out / "done").read_text()) / 60
        for method in methods:
            result = _certify(out, method)
            per_10k = (result["seconds"] - result["bound_seconds"]) / result["count"] * 10_000
            rows.append((name, "CRC-Lip" if method == "crc" else "Lipschitz", result, minutes, per_10k))
    columns = ("run", "certificate", "clean", *(f"VRA@{e}" for e in EPS_NAMES), "train min", "bound s",
               "certify s / 10k")
    table = Table(title="Fashion-MNIST: orthogonal vs GloRo networks (10k test images, proven certificates)")
    for col in columns:
        table.add_column(col, justify="left" if col in ("run", "certificate") else "right")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, kind, r, minutes, per_10k in rows:
        cells = [name, kind, f"{r['clean_accuracy']:.3f}", *(f"{v:.3f}" for v in r["vra"].values()),
                 f"{minutes:.1f}", f"{r['bound_seconds']:.1f}", f"{per_10k:.1f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if args.markdown:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
