"""``certify-fx``: convert, bound, train and certify certifiably robust models.

The CLI is thin: it parses arguments, calls the public ``certify_fx`` API and prints with rich.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Sequence

from .arguments import add_capture_argument, add_model_arguments, input_shape_argument, load_from_args

EXAMPLES = """\
examples:
  certify-fx convert resnet50 --to liresnet -o r50.pt   rewrite a timm ResNet into a LiResNet
  certify-fx convert resnet18 --in-chans 1 --num-classes 10 --input-size 1,28,28 \
      --weights runs/fm_resnet18_ce/checkpoint.pt --calibrate fashion_mnist -o fm.pt
                                                    convert trained weights, fitted back to the source
  certify-fx bound r50.pt                           bound a converted model saved by convert
  certify-fx bound runs/fmnist/checkpoint.pt        bound a training checkpoint's model
  certify-fx bound resnet18                         timm model, random weights, eval mode
  certify-fx bound liresnet_l12w64 --num-classes 10 --input-size 3,32,32
  certify-fx bound mypkg.models:build_model --json  a module path 'module:attribute'
  certify-fx bound ./net.py:Net                     a Python file and a callable in it
  certify-fx export runs/fmnist/checkpoint.pt -o fm.safetensors   trained weights as safetensors
  certify-fx demo                                   bound and certify a small LiResNet
  certify-fx train recipes/fashion_mnist.yaml       train a LiResNet with EMMA on Fashion-MNIST
  certify-fx certify runs/fmnist/checkpoint.pt      clean accuracy and VRA of a trained checkpoint
  certify-fx audit runs/fmnist/checkpoint.pt        attack certified points, certification gap, K tightness
"""


def _input_shape(loaded, given: tuple[int, ...] | None) -> tuple[int, ...]:
    from certify_fx.errors import CertifyFxError

    if given:
        return given
    if loaded.input_shape is not None:
        return loaded.input_shape
    raise CertifyFxError("cannot infer the input size of this model; pass --input-size C,H,W")


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def print_bound(result, console, title: str, seconds: float, show_nodes: bool = True) -> None:
    import torch
    from rich.table import Table

    if show_nodes:
        table = Table(title=f"Lipschitz bound of {title}", caption="K: bound w.r.t. the input; est.: power iteration")
        table.add_column("node", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("operation (folded)", overflow="fold")
        for col in ("factor", "K", "K est."):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("method", no_wrap=True)
        for col in ("s", "share"):
            table.add_column(col, justify="right", no_wrap=True)
        total = max(result.seconds, 1e-9)
        for row in result.nodes:
            table.add_row(row.node, row.kind, row.op, _fmt(row.factor), _fmt(row.lipschitz),
                          _fmt(row.lipschitz_estimate), row.method + ("" if row.sound else " (unproven)"),
                          f"{row.seconds:.2f}", f"{row.seconds / total:.0%}")
        console.print(table)
    elif result.seconds >= 1.0:
        slow = ", ".join(f"{r.node} {r.seconds:.1f} s ({r.seconds / result.seconds:.0%})" for r in result.slowest(3))
        console.print(f"slowest nodes: {slow}")
    m = result.margin
    off = ~torch.eye(m.shape[0], dtype=torch.bool)
    summary = Table(title=f"margin Lipschitz constants K[i, j] of {title}", show_header=False)
    summary.add_row("classes", str(result.num_classes))
    summary.add_row("sound (every factor proven)", "[green]yes[/]" if result.sound else "[red]no[/]")
    summary.add_row("penultimate K", _fmt(result.penultimate))
    spread = (m[off].min(), m[off].mean(), m[off].max())
    summary.add_row("K[i, j] min / mean / max (i != j)", " / ".join(_fmt(float(v)) for v in spread))
    summary.add_row("bound / power-iteration estimate (max)", _fmt(result.tightness))
    summary.add_row("seconds", f"{seconds:.1f}")
    console.print(summary)


def cmd_bound(args: argparse.Namespace) -> int:
    from rich.console import Console

    import certify_fx as cfx

    loaded = load_from_args(args)
    model, shape = loaded.model, _input_shape(loaded, args.input_size)
    start = time.perf_counter()
    result = _bound_with_progress(cfx, model, shape, args.estimate_steps, args.capture)
    seconds = time.perf_counter() - start
    if args.json:
        data = result.to_dict()
        data["model"], data["seconds"] = args.model, seconds
        if not args.full:
            data.pop("estimate")
        print(json.dumps(data, allow_nan=True))
        return 0
    print_bound(result, Console(width=max(Console().width, 110)), args.model, seconds, show_nodes=not args.quiet)
    return 0


def _bound_with_progress(cfx, model, shape, estimate_steps: int, capture: str = "auto"):
    """``cfx.bound`` with per-node progress on stderr (wide models take minutes on a CPU), so
    that stdout stays clean for ``--json``."""
    from certify_fx.progress import progress_display

    with progress_display() as progress:
        return cfx.bound(model, shape, estimate_steps=estimate_steps, progress=progress, capture=capture)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a model, print the rewrite log, parameter counts and the bound, and save it."""
    from rich.console import Console
    from rich.table import Table

    import certify_fx as cfx

    console = Console(width=max(Console().width, 130))
    loaded = load_from_args(args)
    if loaded.conversion:
        raise cfx.CertifyFxError(f"{args.model} is already converted (to {loaded.conversion['to']!r})")
    model, shape = loaded.model, _input_shape(loaded, args.input_size)
    from certify_fx.progress import progress_display

    images = None
    if args.calibrate:
        from certify_fx.data import build_dataset, first_images

        images = first_images(build_dataset(args.calibrate, "train", args.root), args.calibration_images)
        if tuple(images.shape[1:]) != tuple(shape):
            raise cfx.CertifyFxError(f"--calibrate {args.calibrate}: its images have shape {tuple(images.shape[1:])}, "
                                     f"the model takes {tuple(shape)}")
    with progress_display() as progress:
        converted = cfx.convert(model, to=args.to, input_shape=shape, activation=args.activation,
                                bottleneck=args.bottleneck, max_pool=args.max_pool, rescale=args.rescale,
                                trim=args.trim, spatial_mlp=args.spatial_mlp, progress=progress,
                                calibration_data=images)
    table = Table(title=f"rewrite log: {args.model} -> {args.to}")
    table.add_column("pass", no_wrap=True, min_width=27)
    table.add_column("node", no_wrap=True)
    table.add_column("before", overflow="fold")
    table.add_column("after", overflow="fold")
    table.add_column("exact", no_wrap=True)
    for r in converted.rewrite_log:
        table.add_row(r.pass_name, r.node, r.before, r.after, "no" if r.changes_function else "yes")
    console.print(table)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    console.print(f"parameters: {count(model):,} -> {count(converted):,}")
    if args.output:
        cfx.save_converted(converted, args.output, loaded.spec)
        console.print(f"saved to {args.output} (reload: certify_fx.load_converted, or certify-fx bound {args.output})")
    if not args.no_bound:
        start = time.perf_counter()
        result = _bound_with_progress(cfx, converted, shape, args.estimate_steps)
        print_bound(result, console, f"{args.model} ({args.to})", time.perf_counter() - start, show_nodes=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a model's weights to a .safetensors (or .pt) file."""
    from certify_fx.loading import export_model

    what = export_model(load_from_args(args), args.output)
    print(f"wrote {args.output}: {what}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Bound a small LiResNet, then certify a batch with it: the whole pipeline in seconds."""
    import torch
    from rich.console import Console
    from rich.table import Table

    import certify_fx as cfx
    import timm

    import certify_fx.models  # noqa: F401

    console = Console(width=max(Console().width, 110))
    torch.manual_seed(args.seed)
    model = timm.create_model("liresnet_l6w64", num_classes=10, img_size=32).eval()
    console.print("[bold]certify-fx demo[/]: a LiResNet (6 blocks, width 64) on 3x32x32 inputs, random weights")
    start = time.perf_counter()
    result = cfx.bound(model, (3, 32, 32))
    print_bound(result, console, "liresnet_l6w64", time.perf_counter() - start, show_nodes=True)
    x = torch.rand(args.batch, 3, 32, 32)
    start = time.perf_counter()
    cert = cfx.certify(model, x, eps=args.eps, bound=result)
    seconds = time.perf_counter() - start
    table = Table(title=f"certify() on {args.batch} random images (untrained weights)")
    for col in ("eps", "certified", "median radius", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(_fmt(args.eps), f"{int(cert.certified.sum())}/{args.batch}", _fmt(float(cert.radius.median())),
                  f"{seconds:.3f}")
    console.print(table)
    console.print("Trained models certify far more: `certify-fx train recipes/fashion_mnist.yaml`, then "
                  "`certify-fx certify runs/fashion_mnist/checkpoint.pt` (or `make demo`).")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("certify-fx")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; builds without importing torch, timm or the library, so ``--help``
    and argument errors answer at once (each command imports what it needs when it runs)."""
    parser = argparse.ArgumentParser(
        prog="certify-fx",
        description="Deterministic l2 robustness certification: sound margin Lipschitz bounds for real models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"certify-fx {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "bound",
        help="compute sound margin Lipschitz constants K[i, j] of a model",
        description=(
            "Trace MODEL with torch.fx, fold its linear parts, and print a sound upper bound K[i, j] on "
            "the Lipschitz constant of every logit margin f_i - f_j, with a per-node breakdown. "
            "A prediction j is certified at radius eps when f_j - f_i > eps * K[j, i] for all i != j. "
            "Progress names the slowest node so far and its share of the time; the table's last columns "
            "say where the time went. Proven norms of wide layers are kept in ~/.cache/certify-fx/norms "
            "($CERTIFY_FX_CACHE; 'off' keeps them in memory only), so bounding the same weights again "
            "(after convert, another checkpoint with the same body) reads them back."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--input-size", type=input_shape_argument, default=None, metavar="C,H,W",
                   help="input shape without batch (default: the model's config)")
    p.add_argument("--estimate-steps", type=int, default=20,
                   help="power-iteration steps for the estimate column (0 to skip; default 20)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.add_argument("--full", action="store_true", help="with --json, include the estimate matrix")
    p.add_argument("--quiet", action="store_true", help="print only the summary table")
    add_capture_argument(p)
    p.set_defaults(func=cmd_bound)

    c = sub.add_parser(
        "convert",
        help="rewrite a model into a certifiable one (LiResNet, Lipschitz ViT)",
        description=(
            "Trace MODEL with torch.fx and run the conversion passes: fold BatchNorm, make residual "
            "branches linear (LiResNet blocks), swap activations for MinMax, attention for spatial-MLP "
            "token mixing, LayerNorm for Affine. Prints the rewrite log, parameter counts and the "
            "resulting bound; -o saves a file that `certify-fx bound` and certify_fx.load_converted read "
            "without running code from it."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(c)
    c.add_argument("--to", choices=["liresnet", "lipschitz-vit", "lipschitz"], default="liresnet",
                   help="target family (default liresnet; use lipschitz-vit for ViTs)")
    c.add_argument("--input-size", type=input_shape_argument, default=None, metavar="C,H,W",
                   help="input shape without batch (default: the model's config)")
    c.add_argument("--activation", choices=["minmax", "groupsort", "relu"], default="minmax",
                   help="the activation put in place of ReLU, GELU, ...: minmax (pairs), groupsort (groups of 4), or "
                        "relu (keep the model's own activations)")
    c.add_argument("--bottleneck", choices=["auto", "composed", "factored"], default="auto",
                   help="a bottleneck branch's convs: auto (factored when that has fewer parameters), composed or "
                        "factored")
    c.add_argument("--spatial-mlp", choices=["pure", "projected"], default="pure",
                   help="attention becomes token mixing of the residual stream, x + T x, bounded exactly (pure), or "
                        "keeps its value and output projections (projected)")
    c.add_argument("--max-pool", choices=["keep", "conv"], default="keep",
                   help="overlapping max-pools: keep (bounded by sqrt of the overlap) or replace by a strided conv")
    c.add_argument("--no-trim", dest="trim", action="store_false",
                   help="keep kernel taps that only read zero padding (by default they are dropped: same function, "
                        "same bound, less work)")
    c.add_argument("--no-rescale", dest="rescale", action="store_false",
                   help="keep the weights' scale (by default each linear layer is divided by its estimated norm "
                        "where above 1, so the model starts with a sane bound)")
    c.add_argument("--calibrate", default=None, metavar="DATASET",
                   help="fit the converted model to the source on the first training images of DATASET (e.g. "
                        "fashion_mnist; no labels used), so it keeps what the source learned; the log gives each "
                        "block's fit error and the agreement with the source's predictions")
    c.add_argument("--calibration-images", type=int, default=2048, metavar="N",
                   help="how many images --calibrate fits on (default 2048; memory grows with images x "
                        "activation size)")
    c.add_argument("--root", default=None, help="the --calibrate dataset's folder (default: its standard location)")
    c.add_argument("-o", "--output", default=None,
                   help="save the converted model here (.safetensors or .pt; read back without running code)")
    c.add_argument("--no-bound", action="store_true", help="skip computing the bound (it can take minutes)")
    c.add_argument("--estimate-steps", type=int, default=0, help="power-iteration steps for the estimate")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser(
        "export", help="write a model's weights to .safetensors (a trained checkpoint's, a converted model's)",
        description=("Write the weights of MODEL to a file: a converted model (from a training checkpoint or "
                     "`convert -o`) as a converted-model file that every command reads on its own, any other "
                     "model as a state_dict to use with its name and --weights."),
        epilog=("examples:\n  certify-fx export runs/fmnist/checkpoint.pt -o fmnist.safetensors\n"
                "  certify-fx bound fmnist.safetensors                     (if the checkpoint's model was converted)\n"
                "  certify-fx bound liresnet_l6w32 --num-classes 10 --in-chans 1 --kwarg img_size=28 "
                "--weights fmnist.safetensors\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(e)
    e.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write (.safetensors or .pt)")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="bound and certify a small LiResNet (the default main job)",
                       description=cmd_demo.__doc__)
    d.add_argument("--eps", type=float, default=36 / 255, help="radius to certify (default 36/255)")
    d.add_argument("--batch", type=int, default=256, help="images to certify (default 256)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    from .train import add_parsers

    add_parsers(sub)
    from .audit import add_parser as add_audit_parser

    add_audit_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from certify_fx.errors import CertifyFxError

    try:
        return args.func(args)
    except CertifyFxError as exc:  # bad input: one line naming the problem, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else is still one line; the traceback on request
        if os.environ.get("CERTIFY_FX_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or "(no message)"
        print(f"error: {type(exc).__name__}: {message} (set CERTIFY_FX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
