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

import sys
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import Run, certify, script_arguments, show, trained  # noqa: E402

EPS = (0.1, 36 / 255, 0.3, 0.5)
EPS_NAMES = ("0.1", "36/255", "0.3", "0.5")

RUNS = [
    Run("LipConvnet-5 + LLN", "fashion_mnist_lipconvnet_lln.yaml"),
    Run("LipConvnet-5 + projection pooling + MLP head", "fashion_mnist_lipconvnet_crc.yaml", methods=("lipschitz", "crc")),
    Run("LiResNet (liresnet_l6w32) + EMMA", "fashion_mnist.yaml"),
]


def main() -> None:
    args = script_arguments(__doc__, "runs/orthogonal").parse_args()
    console = Console()
    rows = []
    for run, out, minutes in trained(console, RUNS, args.runs_dir):
        for method in run.methods:
            r = certify(out, method, EPS)
            per_10k = (r["seconds"] - r["bound_seconds"]) / r["count"] * 10_000
            rows.append([run.name, "CRC-Lip" if method == "crc" else "Lipschitz", f"{r['clean_accuracy']:.3f}",
                         *(f"{v:.3f}" for v in r["vra"].values()), f"{minutes:.1f}", f"{r['bound_seconds']:.1f}",
                         f"{per_10k:.1f}"])
    columns = ("run", "certificate", "clean", *(f"VRA@{e}" for e in EPS_NAMES), "train min", "bound s",
               "certify s / 10k")
    markdown = show(console, "Fashion-MNIST: orthogonal vs GloRo networks (10k test images, proven certificates)",
                    columns, rows)
    if args.markdown:
        print(markdown)


if __name__ == "__main__":
    main()
