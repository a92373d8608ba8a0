"""``certify-fx train`` and ``certify-fx certify``: run a recipe, certify a checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .arguments import add_capture_argument, add_model_arguments, add_test_set_arguments, load_from_args

TRAIN_EXAMPLES = """\
examples:
  certify-fx train recipes/fashion_mnist.yaml                  LiResNet + EMMA on Fashion-MNIST (CPU, minutes)
  certify-fx train recipes/fashion_mnist.yaml --set epochs=2 --set output_dir=runs/quick
  certify-fx train recipes/cifar10.yaml --set data.root=~/data --set model.name=liresnet_l6w128
  certify-fx train --resume runs/fmnist/checkpoint.pt           continue an interrupted run exactly, in its folder
  certify-fx train recipes/fashion_mnist.yaml --overwrite       replace the earlier run in the same output_dir
  certify-fx runs runs/                                         list runs and their best VRA
  torchrun --nproc_per_node 8 -m certify_fx train recipes/imagenet.yaml   DDP (NCCL on GPUs, gloo on CPU)

Every recipe key can be overridden with --set section.key=value (values are YAML: 3, 1e-3,
[crop, flip], null). Unknown keys are errors. An output_dir that already holds a run is refused
(use --resume, --overwrite or another --set output_dir=DIR). Metrics go to OUTPUT_DIR/log.jsonl and
OUTPUT_DIR/summary.csv (and TensorBoard scalars if tensorboard is installed); the checkpoint,
rewritten atomically every checkpoint_every epochs (and every checkpoint_every_steps steps), to
OUTPUT_DIR/checkpoint.pt. Ctrl-C or SIGTERM stops at the next step with a checkpoint; --resume
continues from that very step, with the same batches and random state.
"""

CERTIFY_EXAMPLES = """\
examples:
  certify-fx certify runs/fmnist/checkpoint.pt                  the recipe's test set and radii
  certify-fx certify runs/fmnist/checkpoint.pt --eps 0.1,0.2,0.5 --plot curve.png
  certify-fx certify runs/fmnist/checkpoint.pt --json           {"clean_accuracy", "vra", "bound", "seconds"}
  certify-fx certify fm.pt --data fashion_mnist                 a model saved by `certify-fx convert -o fm.pt`
  certify-fx certify runs/fashion_mnist_lipconvnet_crc/checkpoint.pt --method crc   the CRC-Lip certificate
  certify-fx certify runs/fmnist/checkpoint.pt --top-k 3        labels certified to stay among the top 3
  certify-fx certify liresnet_l6w32 --weights w.safetensors --num-classes 10 --in-chans 1 \
      --kwarg img_size=28 --data fashion_mnist                  a model name and a weights file
"""


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe (see `certify-fx train --help`)."""
    from rich.console import Console

    from certify_fx.errors import RecipeError
    from certify_fx.train import Trainer, TrainingInterrupted, history_table, load_checkpoint, load_recipe, recipe_from_dict
    from certify_fx.recipe import apply_overrides

    if args.recipe is None and args.resume is None:
        raise RecipeError("give a RECIPE file, or --resume CHECKPOINT to continue a run")
    if args.resume is not None and args.overwrite:
        raise RecipeError("--overwrite replaces a run; --resume continues one: give one of them")
    if args.recipe is not None:
        recipe = load_recipe(args.recipe, args.set)
    else:  # the checkpoint's own recipe, with overrides
        recipe = recipe_from_dict(apply_overrides(load_checkpoint(args.resume)["recipe"], args.set))
    # A resumed run continues in its checkpoint's folder unless --set output_dir names another.
    chosen = any(item.split("=", 1)[0].strip() == "output_dir" for item in args.set)
    # logs and pipes: tables 120 wide, and lines never wrapped (a path split over two lines cannot be copied)
    console = Console() if sys.stdout.isatty() else Console(width=120, soft_wrap=True)
    trainer = Trainer(recipe, resume=args.resume, console=console, trust_source=args.trust_source,
                      overwrite=args.overwrite, output_dir=recipe.output_dir if chosen or args.resume is None else None)
    try:
        if trainer.complete:
            console.print(f"the run in {trainer.run.path} is complete ({trainer.epoch}/{recipe.epochs} epochs); "
                          f"to train longer: certify-fx train --resume {trainer.run.checkpoint} --set epochs=N")
            return 0
        history = trainer.fit()
        if trainer.ctx.is_main:
            console.print(history_table(history, f"{recipe.model.name} on {recipe.data.name} ({recipe.loss.name})"))
            console.print(f"checkpoint: {trainer.run.checkpoint}   log: {trainer.run.log}   summary: {trainer.run.summary}")
    except TrainingInterrupted as stop:
        if trainer.ctx.is_main:
            console.print(f"stopped by {stop.signal_name} after step {stop.step}; checkpoint written. "
                          f"Continue with: certify-fx train --resume {stop.checkpoint}")
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        if trainer.ctx.is_main:
            hint = (f"continue with: certify-fx train --resume {trainer.run.checkpoint}"
                    if trainer.run.checkpoint.exists() else "no checkpoint was written yet; nothing to resume")
            console.print(f"interrupted; {hint}")
        return 130
    finally:
        trainer.close()
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    """Certify a model on a test set with the proven bound."""
    from rich.console import Console
    from rich.table import Table
    from torch.utils.data import DataLoader

    import certify_fx as cfx
    from certify_fx.plots import plot_certified_accuracy, require_matplotlib
    from certify_fx.progress import progress_display

    if args.plot:
        require_matplotlib()  # before minutes of certification, not after
    loaded = load_from_args(args)
    model = loaded.model
    test = loaded.evaluation_data(args.data, args.root, args.limit)  # a missing dataset fails before the bound
    recipe, data_name, shape, dataset = test.recipe, test.name, test.input_shape, test.dataset
    eps = args.eps or recipe.eval_eps
    console = Console(stderr=args.json)
    start = time.perf_counter()
    method = cfx.certificates.certificate_method(args.method, classes=args.crc_classes,
                                                 top_k=None if args.top_k == 1 else args.top_k)
    with progress_display() as progress:  # on stderr: stdout stays clean for --json
        bound = cfx.certificate_bound(model, shape, method, progress=progress, capture=args.capture)
        bound_seconds = time.perf_counter() - start
        result = cfx.evaluate_certified(model, DataLoader(dataset, batch_size=recipe.data.eval_batch_size), eps, method,
                                        bound, keep_radii=True, progress=progress)
    seconds = time.perf_counter() - start
    summary = {"clean_accuracy": result.clean_accuracy, "vra": {str(e): v for e, v in result.vra.items()},
               "bound": method.margin_bound(bound).margin.max().item(), "seconds": seconds,
               "bound_seconds": bound_seconds, "count": result.count, "sound": bound.sound,
               "model": loaded.name, "data": data_name, "method": args.method, "top_k": args.top_k}
    if args.plot:
        plot_certified_accuracy(result.radii, args.plot, eps, f"{summary['model']} on {summary['data']}")
    if args.json:
        print(json.dumps(summary))
        return 0
    table = Table(title=f"{loaded.name} on {data_name} test ({result.count} images), {method.title}")
    for col in ("metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    top = "" if args.top_k == 1 else f"top-{args.top_k} "
    table.add_row(f"clean {top}accuracy", f"{result.clean_accuracy:.4f}")
    for e, v in result.vra.items():
        table.add_row(f"{top}VRA @ eps={e:.4g}", f"{v:.4f}")
    for label, value in method.constants(bound).items():
        table.add_row(label.replace("[", "\\[") + " (sound)", f"{value:.6g}")
    table.add_row("bound seconds", f"{bound_seconds:.2f}")
    table.add_row("total seconds", f"{seconds:.2f}")
    console.print(table)
    if args.plot:
        console.print(f"certified accuracy curve: {args.plot}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """List the training runs under a folder with their best VRA."""
    from rich.console import Console
    from rich.table import Table

    from certify_fx.train.runs import find_runs

    runs = find_runs(args.root)
    if args.json:
        print(json.dumps([r.to_dict() for r in runs]))
        return 0
    console = Console() if sys.stdout.isatty() else Console(width=160, soft_wrap=True)
    if not runs:
        console.print(f"no runs under {args.root} (a run folder holds log.jsonl and recipe.yaml)")
        return 0
    table = Table(title=f"runs under {args.root}")
    for col in ("run", "model", "data", "loss", "epochs", "best VRA", "at eps", "epoch", "clean", "checkpoint",
                "modified"):
        table.add_column(col, justify="right" if col in ("epochs", "best VRA", "at eps", "epoch", "clean") else "left")
    fmt = lambda v, spec=".3f": "" if v is None else format(v, spec)  # noqa: E731
    for r in sorted(runs, key=lambda r: -1 if r.best_vra is None else r.best_vra, reverse=True):
        table.add_row(os.path.relpath(r.path, args.root), r.model, r.data, r.loss, f"{r.epochs_done}/{r.epochs}",
                      fmt(r.best_vra), fmt(r.eps, ".4g"), fmt(r.best_epoch, "d"), fmt(r.clean_accuracy),
                      "yes" if r.has_checkpoint else "no", r.modified)
    console.print(table)
    return 0


def add_parsers(sub) -> None:
    t = sub.add_parser(
        "train", help="train a certifiably robust model from a YAML recipe (GloRo with EMMA/TRADES/CLL)",
        description=("Train the model a recipe describes as a GloRo net: each step computes the logits and a "
                     "differentiable power-iteration estimate of the margin Lipschitz constants K[i, j], and the "
                     "recipe's loss (emma, la, trades, gloro_ce, cll, crc_lip, ce) pushes certified margins up; each epoch the "
                     "proven bound certifies the test set. The same command runs under torchrun for DDP."),
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", default=None, help="YAML recipe (see recipes/); optional with --resume")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set epochs=5 --set data.batch_size=128 (repeatable)")
    t.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint written by an earlier run (weights, optimiser, iterates)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in the recipe's output_dir (otherwise refused)")
    t.add_argument("--trust-source", action="store_true",
                   help="allow a recipe whose model.name is Python code (module:attr, file.py:attr) to import it")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("runs", help="list training runs under a folder with their best VRA",
                       description=("Find every run folder (log.jsonl, recipe.yaml) under ROOT and print its model, "
                                    "data, loss, progress and best verified robust accuracy at the recipe's eps "
                                    "(best first). Reads no checkpoint, so it is instant."),
                       epilog="examples:\n  certify-fx runs\n  certify-fx runs runs/ --json\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("root", nargs="?", default="runs", help="folder to search (default: runs)")
    r.add_argument("--json", action="store_true", help="print a JSON list of runs")
    r.set_defaults(func=cmd_runs)

    c = sub.add_parser(
        "certify", help="certify a trained checkpoint (or any model) on a test set (clean accuracy, VRA, bound)",
        description=("Load the model (a checkpoint's model is rebuilt from its recorded recipe and tested on the "
                     "recipe's test set; other models need --data), compute the proven margin "
                     "Lipschitz bound once, and certify every test image: a prediction j is robust at eps when "
                     "f_j - f_i > eps * K[j, i] for all i != j. Prints clean accuracy and verified robust "
                     "accuracy (VRA) per radius."),
        epilog=CERTIFY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(c)
    add_test_set_arguments(c, None, "certify only the first N test images")
    c.add_argument("--crc-classes", type=int, default=None, metavar="K",
                   help="with --method crc, solve only for the K classes nearest by the Lipschitz radius (the "
                        "others keep their Lipschitz radius: still sound, faster with many classes)")
    c.add_argument("--json", action="store_true",
                   help="print JSON with keys clean_accuracy, vra {eps: value}, bound, seconds")
    c.add_argument("--plot", default=None, metavar="PNG", help="draw certified accuracy against radius")
    add_capture_argument(c)
    c.set_defaults(func=cmd_certify)
