"""What each addition of the newest anchors is worth on Fashion-MNIST: the ablation of docs/results.md.

Every row trains ``recipes/fashion_mnist_robust_liresnet.yaml`` (8 epochs, certified at eps 0.5) with the
``--set`` overrides below, so one change at a time can be read off: the loss (EMMA vs logit
annealing), the training radius (1.5x vs 3x eps, the LiResNet authors' schedule), the dense part
(the plain neck vs CHORD's Cholesky-orthogonalised neck and 8 dense layers), and the backbone block
(LiResNet vs BRO, on the CHORD skeleton; SOC is timed only). Each run is certified with the proven bound on
the 10k test images at 0.1, 36/255, 0.3, 0.5 and 1.0 (``certify-fx certify --json``).

``train min`` is the run's wall clock as it ran; ``ms / step`` is one training step of the
row's model and loss measured here, all rows interleaved in one process on the idle machine
(median of ``--repeats``), the fair speed comparison. Runs are resumable (see ``_runs.py``).

    python benchmarks/fashion_mnist_anchors.py [--runs-dir runs/anchors] [--markdown] [--repeats 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, Run, certify, script_arguments, show, trained, vra_at  # noqa: E402

EPS = (0.1, 36 / 255, 0.3, 0.5, 1.0)
EPS_NAMES = ("0.1", "36/255", "0.3", "0.5", "1.0")
RECIPE = "fashion_mnist_robust_liresnet.yaml"
EVAL = f"eps.evaluate=[{', '.join(f'{e:.8g}' for e in EPS)}]"


def _variant(model: str, loss: str, multiplier: float, clip: float | None = None, **kwargs: object) -> tuple[str, ...]:
    """Overrides that pin every key the rows vary, whatever the recipe file holds today."""
    neck = 512 if model.startswith("liresnet") else 256
    model_kwargs = ", ".join(f"{k}: {v}" for k, v in {"neck_dim": neck, **kwargs}.items())
    return (f"model.name={model}", f"model.kwargs={{{model_kwargs}}}", f"loss.name={loss}",
            f"eps.train_multiplier={multiplier}", f"optim.grad_clip={'null' if clip is None else clip}", EVAL)


#: the 16 x 16 stem: a 28 x 28 image padded by 4 (the default pads by 2 and gives 14 x 14 features,
#: whose last 2 rows and columns the k4 s4 neck never reads)
STEM16 = "[5, 2, 4]"

RUNS = [
    Run("LiResNet, EMMA, 1.5x (the recipe before)", RECIPE, _variant("liresnet_l6w32", "emma", 1.5)),
    Run("LiResNet, LA, 1.5x", RECIPE, _variant("liresnet_l6w32", "la", 1.5)),
    Run("LiResNet, LA, 3x", RECIPE, _variant("liresnet_l6w32", "la", 3.0)),
    Run("CHORD LiResNet, EMMA, 3x, clip 3 (the anchor's setting)", RECIPE,
        _variant("chord_liresnet_l6w32", "emma", 3.0, 3.0)),
    Run("CHORD LiResNet, LA, 3x", RECIPE, _variant("chord_liresnet_l6w32", "la", 3.0)),
    Run("CHORD LiResNet, LA, 2x", RECIPE, _variant("chord_liresnet_l6w32", "la", 2.0)),
    Run("CHORD LiResNet, LA, 2x, inputs x - 0.5", RECIPE,
        _variant("chord_liresnet_l6w32", "la", 2.0, mean="[0.5]", std="[1.0]")),
    Run("CHORD LiResNet, LA, 2x, 16x16 stem", RECIPE, _variant("chord_liresnet_l6w32", "la", 2.0, stem=STEM16)),
    Run("BRONet, LA, 2x", RECIPE, _variant("bronet_l6w32", "la", 2.0)),
    Run("BRONet, LA, 2.5x, 16x16 stem", RECIPE, _variant("bronet_l6w32", "la", 2.5, stem=STEM16)),
    Run("BRONet, LA, 3x, 16x16 stem", RECIPE, _variant("bronet_l6w32", "la", 3.0, stem=STEM16)),
    Run("fashion_mnist_robust_fast.yaml: CHORD LiResNet, LA, 1.5x, 16x16 stem, 4 epochs",
        "fashion_mnist_robust_fast.yaml", (EVAL,)),
    Run("the same, 2x", "fashion_mnist_robust_fast.yaml", (EVAL, "eps.train_multiplier=2.0")),
]

#: timed only (``ms / step``): 8 epochs of SOC blocks take about 3x the LiResNet blocks' time here
TIMED_ONLY = [Run("CHORD skeleton with SOC blocks, LA, 2x", RECIPE, _variant("chord_liresnet_l6w32", "la", 2.0,
                                                                              block="soc"))]


def step_milliseconds(runs: list[Run], repeats: int) -> list[float]:
    """One training step (forward, K, loss, backward, update) of each run's model and loss on a
    batch of 256 Fashion-MNIST-sized inputs, interleaved, median of ``repeats``."""
    from certify_fx.train import Trainer, load_recipe
    from timing import interleaved_medians, median

    steps = {}
    for run in runs:
        recipe = load_recipe(ROOT / "recipes" / run.recipe, [*run.overrides, "output_dir=/tmp/cfx-anchors-timing",
                                                              "data.name=synthetic",
                                                              "data.synthetic={num_classes: 10, in_chans: 1, "
                                                              "img_size: 28, size: 512}"])
        trainer = Trainer(recipe, overwrite=True)
        x, y = torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,))

        def step(trainer: Trainer = trainer) -> None:
            logits, margin, _ = trainer.net(x)
            loss = trainer.loss_fn(logits, y, margin, 0.5)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()

        trainer.net.train()
        steps[run.name] = step
    times = interleaved_medians(steps, repeats, torch.device("cpu"))
    return [1000 * median(times[run.name]) for run in runs]


def main() -> None:
    parser = script_arguments(__doc__, "runs/anchors")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (0: no step timing)")
    args = parser.parse_args()
    console = Console()
    rows = []
    for run, out, minutes in trained(console, RUNS, args.runs_dir):
        r = certify(out, "lipschitz", EPS)
        rows.append([run.name, f"{r['clean_accuracy']:.3f}", *(f"{vra_at(r, e):.3f}" for e in EPS), f"{minutes:.1f}"])
    columns = ["run", "clean", *(f"VRA@{e}" for e in EPS_NAMES), "train min"]
    if args.repeats:
        rows += [[run.name, *["-"] * (len(columns) - 1)] for run in TIMED_ONLY]
        for row, ms in zip(rows, step_milliseconds(RUNS + TIMED_ONLY, args.repeats)):
            row.append(f"{ms:.0f}")
        columns.append("ms / step")
    markdown = show(console, "Fashion-MNIST, eps 0.5, 8 epochs: the anchors' additions one at a time (10k test "
                    "images, proven certificates)", columns, rows)
    if args.markdown:
        print(markdown)


if __name__ == "__main__":
    main()
