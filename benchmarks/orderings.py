"""The papers' orderings, reproduced on data this machine has: the tables of docs/results.md.

Fashion-MNIST studies (each run a `certify-fx train` of recipes/fashion_mnist.yaml with overrides,
certified on the 10k test images with the proven bound; identical runs are shared between studies):

* depth: LiResNet vs plain ConvNet (gloro_convnet) vs nonlinear ResNet blocks (gloro_resnet), L = 6
  and 12, width 32 (LiResNet paper, App. C/D: LiResNet keeps improving with depth, the others not);
* losses: GloRo-CE, GloRo-TRADES, EMMA and CLL on the same LiResNet (EMMA >= TRADES expected);
* eps: trained for eps 0.1 / 0.5 / 1.0 (eps_train ramping to 2 eps), each evaluated at 0.1 / 0.3 / 0.5 / 1.0;
* best: the full-length recipes, fashion_mnist.yaml (eps 0.1) and fashion_mnist_robust_liresnet.yaml (the
  clean-vs-VRA@0.5 trade-off), each audited with `certify-fx audit` on 1000 test images.

Two moons (CLL paper, Fig. 4 / App. B): a 7-layer MinMax MLP (10-20-40-40-20-10-2) trained with
GloRo-CE and with CLL at the true margin (eps = 0.15) on 2000 points of scikit-learn's make_moons
moved within disks of radius 0.1; certified robust accuracy at 0.15 on those points and on 2000 new
ones, and a plot of both decision boundaries with their certified margins.

Resumable: finished runs are skipped, an interrupted one continues from its checkpoint. Tables
print as they complete; --write puts them and the plots into docs/results.md (between markers).

    python benchmarks/orderings.py [--study depth losses eps best moons] [--epochs 3] [--write]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, Run, audit, certify, show, train, vra_at  # noqa: E402

import certify_fx as cfx  # noqa: E402
from certify_fx.data import TWO_MOONS_GAP, two_moons  # noqa: E402
from certify_fx.losses import cll, gloro_ce  # noqa: E402
from certify_fx.nn import MinMax  # noqa: E402
from certify_fx.plots import plot_vra_curves  # noqa: E402

EPS_GRID = [round(0.05 * i, 2) for i in range(0, 21)]  # 0 .. 1.0: the curves; 0 = clean accuracy
TABLE_EPS = (0.1, 0.3, 0.5, 1.0)


def fashion_mnist_run(epochs: int, model: str = "liresnet_l6w32", loss: str = "emma", eps: float = 0.1) -> Run:
    """recipes/fashion_mnist.yaml shortened to ``epochs`` (evaluated once, at the end)."""
    name = f"{model} {loss} eps {eps:g} {epochs} epochs"
    overrides = (f"epochs={epochs}", f"model.name={model}", f"loss.name={loss}", f"eps.eps={eps}",
                 "optim.warmup_epochs=0.5", f"bound.eval_every={epochs}", f"eps.evaluate=[{eps}]")
    return Run(name, "fashion_mnist.yaml", overrides)


def studies(epochs: int) -> dict[str, tuple[str, list[tuple[str, Run]]]]:
    """Study name -> (title, [(row label, run)])."""
    depth = [(f"{family} L={d}", fashion_mnist_run(epochs, f"{family}_l{d}w32"))
             for family in ("liresnet", "gloro_convnet", "gloro_resnet") for d in (6, 12)]
    losses = [(label, fashion_mnist_run(epochs, loss=loss))
              for label, loss in (("GloRo-CE", "gloro_ce"), ("GloRo-TRADES", "trades"), ("EMMA", "emma"),
                                  ("CLL", "cll"))]
    eps = [(f"eps {e:g} (trained up to {2 * e:g})", fashion_mnist_run(epochs, eps=e)) for e in (0.1, 0.5, 1.0)]
    best = [("fashion_mnist.yaml (eps 0.1)", Run("fashion_mnist", "fashion_mnist.yaml")),
            ("fashion_mnist_robust_liresnet.yaml (eps 0.5)",
             Run("fashion_mnist_robust", "fashion_mnist_robust_liresnet.yaml"))]
    return {
        "depth": (f"Depth: block kinds at L = 6 and 12 (width 32, EMMA, eps 0.1, {epochs} epochs)", depth),
        "losses": (f"Losses on liresnet_l6w32 (eps 0.1, {epochs} epochs)", losses),
        "eps": (f"Training radius on liresnet_l6w32 (EMMA, the LiResNet schedule ramps eps_train from 0.1 eps "
                f"to 2 eps; {epochs} epochs)", eps),
        "best": ("The full-length recipes: eps 0.1 and the trade-off recipe for eps 0.5", best),
    }


def fashion_mnist_study(console: Console, runs_dir: Path, title: str, rows: list[tuple[str, Run]],
                        figure: Path, audited: bool = False) -> str:
    table, curves = [], {}
    for label, run in rows:
        out = runs_dir / run.slug
        minutes = train(console, run, out)
        result = certify(out, "lipschitz", EPS_GRID[1:])
        curve = {0.0: result["clean_accuracy"], **{float(k): v for k, v in result["vra"].items()}}
        curves[label] = curve
        table.append([label, f"{result['clean_accuracy']:.3f}", *(f"{vra_at(result, e):.3f}" for e in TABLE_EPS),
                      f"{result['bound']:.2f}", f"{minutes:.1f}", f"{result['seconds']:.1f}"])
    columns = ("run", "clean", *(f"VRA@{e:g}" for e in TABLE_EPS), "max K", "train min", "certify s")
    markdown = show(console, f"Fashion-MNIST. {title}", columns, table)
    plot_vra_curves(curves, figure, title)
    text = f"### {title}\n\n{markdown}\n\n![{title}]({figure.parent.name}/{figure.name})\n"
    if audited:
        text += "\n" + audit_table(console, runs_dir, rows)
    return text


def audit_table(console: Console, runs_dir: Path, rows: list[tuple[str, Run]]) -> str:
    """``certify-fx audit`` of each run on the first 1000 test images: violations, VRA against
    empirical robust accuracy, and the tightness of K on the most frequent margins."""
    lines = []
    for label, run in rows:
        report = audit(runs_dir / run.slug, TABLE_EPS)
        ratios = ", ".join(f"{t['ratio']:.2f}" for t in report["k_tightness"])
        cells = [[f"{float(e):g}", f"{v:.3f}", f"{report['empirical_robust_accuracy'][e]:.3f}",
                  f"{report['empirical_robust_accuracy'][e] - v:.3f}"] for e, v in report["vra"].items()]
        title = (f"Audit of {label} ({report['count']} test images): {len(report['violations'])} violations, "
                 f"K / lower bound {ratios} on the {len(report['k_tightness'])} most frequent margins, "
                 f"{report['seconds']:.0f} s")
        lines.append(f"{title}\n\n" + show(console, title, ("eps", "VRA", "empirical robust accuracy", "gap"), cells))
    return "\n\n".join(lines) + "\n"


# ---------------------------------------------------------------- two moons

MOONS_EPS = 0.15  # half the true margin: (TWO_MOONS_GAP - 2 * 0.1) / 2
MOONS_WIDTHS = (10, 20, 40, 40, 20, 10)


def minmax_mlp(widths=MOONS_WIDTHS, in_features: int = 2, classes: int = 2) -> nn.Sequential:
    """The CLL paper's two-moons network: Linear layers of ``widths`` with MinMax between them."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), MinMax()]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, classes))


def train_moons(loss: str, epochs: int, seed: int = 0) -> tuple[nn.Module, float]:
    """App. B, Table B1: batch 100, Adam 1e-3 -> 1e-4 at 40% of training; CLL with p annealed
    1e-3 -> 1e-12 (polynomial decay, power 50) and lam 1e-6; 5 power-iteration steps per forward."""
    torch.manual_seed(seed)
    data = two_moons(2000, seed=seed)
    model = minmax_mlp()
    gloro = cfx.GloRo(model, MOONS_EPS, input_shape=(2,), power_steps=5).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=100, shuffle=True)
    total, step, start = epochs * len(loader), 0, time.perf_counter()
    for epoch in range(epochs):
        if epoch == int(0.4 * epochs):
            for group in optimizer.param_groups:
                group["lr"] = 1e-4
        for x, y in loader:
            logits, margin = model(x), gloro.margin()
            if loss == "cll":
                p = 1e-12 + (1e-3 - 1e-12) * (1 - step / total) ** 50
                value = cll(logits, y, margin, MOONS_EPS, p=p, lam=1e-6)
            else:
                value = gloro_ce(logits, y, margin, MOONS_EPS)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            step += 1
    return model.eval(), time.perf_counter() - start


def moons_study(console: Console, epochs: int, figure: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, panels = [], []
    train_x, train_y = two_moons(2000, seed=0).tensors
    test_x, test_y = two_moons(2000, seed=1).tensors
    for label, loss in (("GloRo-CE", "gloro_ce"), ("CLL", "cll")):
        model, seconds = train_moons(loss, epochs)
        bound = cfx.bound(model, (2,), estimate_steps=0)
        cells, robust = [label], []
        for x, y in ((train_x, train_y), (test_x, test_y)):
            with torch.no_grad():
                cert = cfx.certify(model, x, MOONS_EPS, bound)
            hit = cert.pred == y
            robust.append(hit & cert.certified)
            cells += [f"{hit.float().mean():.3f}", f"{robust[-1].float().mean():.3f}"]
        rows.append([*cells, f"{bound.margin.max():.2f}", f"{seconds / 60:.1f}"])
        panels.append((label, model, bound, ~robust[0]))  # the training points drawn red: wrong or not certified
    columns = ("loss", "train clean", f"train CRA@{MOONS_EPS:g}", "test clean", f"test CRA@{MOONS_EPS:g}", "K",
               "train min")
    title = f"Two moons, 7-layer MinMax MLP, eps {MOONS_EPS:g} (the true margin), {epochs} epochs"
    markdown = show(console, title, columns, rows)

    grid = torch.stack(torch.meshgrid(torch.linspace(-1.5, 2.5, 300), torch.linspace(-1.0, 1.5, 200),
                                      indexing="xy"), dim=-1).reshape(-1, 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.6))
    for ax, (label, model, bound, bad) in zip(axes, panels):
        with torch.no_grad():
            logits = model(grid)
        # Signed certified distance to the boundary: (f_1 - f_0) / K; the margin is |.| = eps.
        signed = ((logits[:, 1] - logits[:, 0]) / bound.margin[0, 1]).reshape(200, 300)
        ax.contourf(grid[:, 0].reshape(200, 300), grid[:, 1].reshape(200, 300), signed.sign(), alpha=0.15,
                    cmap="coolwarm")
        ax.contour(grid[:, 0].reshape(200, 300), grid[:, 1].reshape(200, 300), signed,
                   levels=[-MOONS_EPS, 0, MOONS_EPS], colors=["grey", "black", "grey"], linewidths=1)
        ax.scatter(*train_x[~bad].T, c=train_y[~bad], cmap="coolwarm", s=2)
        ax.scatter(*train_x[bad].T, c="red", s=6, label="wrong or not certified")
        ax.set_title(f"{label}: CRA {1 - bad.float().mean():.3f}, K {bound.margin.max():.2f}", fontsize=9)
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    note = (f"Noiseless moons are {TWO_MOONS_GAP} apart; within disks of radius 0.1 the classes stay 0.3 apart, "
            f"so {MOONS_EPS} is the largest radius at which every point can be certified.")
    return f"### {title}\n\n{note}\n\n{markdown}\n\n![{title}]({figure.parent.name}/{figure.name})\n"


# ---------------------------------------------------------------- docs/results.md

def write_section(results: Path, name: str, text: str) -> None:
    """Replace the generated section ``name`` of ``results`` (between its markers; appended the
    first time)."""
    begin, end = f"<!-- {name}:begin (benchmarks/orderings.py --write) -->", f"<!-- {name}:end -->"
    document = results.read_text() if results.exists() else "# Results\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    document = pattern.sub(lambda _: block, document) if pattern.search(document) else f"{document}\n{block}\n"
    results.write_text(document)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", nargs="+", default=["depth", "losses", "eps", "best", "moons"],
                        choices=["depth", "losses", "eps", "best", "moons"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each Fashion-MNIST study run (3)")
    parser.add_argument("--moons-epochs", type=int, default=1000, help="two-moons epochs (1000, as the paper)")
    parser.add_argument("--runs-dir", default="runs/orderings")
    parser.add_argument("--write", action="store_true", help="write the tables into the results page")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md",
                        help="the results page (docs/results.md); plots go to results/ next to it")
    args = parser.parse_args()
    console = Console()
    fashion = studies(args.epochs)
    for name in args.study:
        figure = args.results.parent / "results" / f"{name}.png"
        if name == "moons":
            text = moons_study(console, args.moons_epochs, figure)
        else:
            title, rows = fashion[name]
            text = fashion_mnist_study(console, Path(args.runs_dir), title, rows, figure, audited=name == "best")
        if args.write:
            write_section(args.results, name, text)
            console.print(f"wrote the {name} section of {args.results} and {figure}")
        else:
            console.print(f"plot: {figure} (--write also puts the table into {args.results})")


if __name__ == "__main__":
    main()
