"""``certify-fx audit``: is the certificate right, and how much does it leave on the table?"""

from __future__ import annotations

import argparse
import json
import time

from .arguments import add_capture_argument, add_model_arguments, add_test_set_arguments, load_from_args

AUDIT_EXAMPLES = """examples:
  certify-fx audit runs/fashion_mnist/checkpoint.pt                      1000 test images, the recipe's radii
  certify-fx audit runs/fashion_mnist/checkpoint.pt --eps 0.1,0.3,0.5 --plot gap.png
  certify-fx audit runs/fashion_mnist/checkpoint.pt --json              {"violations", "vra", "empirical_robust_accuracy", "k_tightness", ...}
  certify-fx audit runs/fashion_mnist_lipconvnet_crc/checkpoint.pt --method crc
  certify-fx audit runs/fashion_mnist/checkpoint.pt --top-k 2          labels certified to stay in the top 2
  certify-fx audit fm.pt --data fashion_mnist --limit 200               a model saved by `certify-fx convert -o fm.pt`

exit status: 0 when no attack succeeds inside a certified radius, 1 when one does (each violation
is printed with its index, certified radius and the distance at which the class changed), 2 on
bad input.
"""


def cmd_audit(args: argparse.Namespace) -> int:
    """Attack certified points inside their radii; the certification gap; the tightness of K."""
    from rich.console import Console
    from rich.table import Table
    from torch.utils.data import DataLoader

    import certify_fx as cfx
    from certify_fx.audit import audit
    from certify_fx.plots import plot_certification_gap, require_matplotlib
    from certify_fx.progress import progress_display

    if args.plot:
        require_matplotlib()
    loaded = load_from_args(args)
    model = loaded.model.eval()
    test = loaded.evaluation_data(args.data, args.root, args.limit)
    eps = args.eps or test.recipe.eval_eps
    console = Console(stderr=args.json)
    start = time.perf_counter()
    with progress_display() as progress:
        bound = cfx.certificate_bound(model, test.input_shape, args.method, progress=progress, capture=args.capture)
        report = audit(model, DataLoader(test.dataset, batch_size=args.batch_size), eps, bound, method=args.method,
                       steps=args.steps, restarts=args.restarts, progress=progress, top_k=args.top_k)
    summary = {**report.to_dict(), "top_k": args.top_k, "model": loaded.name, "data": test.name,
               "seconds": time.perf_counter() - start}
    if args.plot:
        plot_certification_gap(report.vra, report.empirical_robust_accuracy, args.plot,
                               f"{loaded.name} on {test.name}")
    if args.json:
        print(json.dumps(summary))
        return 1 if report.violations else 0
    top = "" if args.top_k == 1 else f", top-{args.top_k}"
    title = f"{loaded.name} on {test.name} ({report.count} images, {args.method} certificate{top})"
    gap = Table(title=title)
    for col in ("eps", "VRA (certified)", "empirical robust (attacks)", "gap"):
        gap.add_column(col, justify="right")
    for e in report.vra:
        era = report.empirical_robust_accuracy[e]
        gap.add_row(f"{e:.4g}", f"{report.vra[e]:.4f}", f"{era:.4f}", f"{era - report.vra[e]:.4f}")
    console.print(f"clean accuracy {report.clean_accuracy:.4f}")
    console.print(gap)
    tight = Table(title="K tightness: proven K[i, j] against a gradient-ascent + secant lower bound")
    for col in ("margin", "points", "K (proven)", "lower bound", "ratio"):
        tight.add_column(col, justify="right")
    for t in report.k_tightness:
        tight.add_row(f"f{t.i} - f{t.j}", str(t.count), f"{t.bound:.4f}", f"{t.lower:.4f}", f"{t.ratio:.3f}")
    console.print(tight)
    nodes = Table(title="bound of every node (bound().nodes)")
    for col in ("node", "op", "kind", "factor", "Lipschitz so far", "method"):
        nodes.add_column(col, justify="left" if col in ("node", "op", "kind", "method") else "right")
    for n in report.nodes:
        nodes.add_row(n.node, n.op[:60], n.kind, f"{n.factor:.4g}", f"{n.lipschitz:.4g}", n.method)
    console.print(nodes)
    if report.violations:
        for v in report.violations:
            console.print(f"[red]violation[/]: point {v.index} certified at radius {v.radius:.4f} changed from class "
                          f"{v.predicted} to {v.became} at distance {v.distance:.4f}")
        console.print(f"[red bold]{len(report.violations)} violation(s): the certificates are false[/]")
        return 1
    console.print(f"0 violations: no attack changed a prediction inside its certified radius "
                  f"({summary['seconds']:.1f} s)")
    if args.plot:
        console.print(f"certification gap plot: {args.plot}")
    return 0


def add_parser(sub) -> None:
    a = sub.add_parser(
        "audit", help="attack certified points inside their radii; certification gap; tightness of K",
        description=("Certify the test set, then (1) attack every certified point inside its certified radius with "
                     "l2 PGD (restarts, a step schedule) and a boundary-following attack: any success is a "
                     "violation, i.e. a false certificate; (2) report the empirical robust accuracy under those "
                     "attacks (an upper bound) next to the VRA (a lower bound) at each eps; (3) compare the proven "
                     "K[i, j] of the most frequent margins with a gradient-ascent + secant lower bound, and list "
                     "the bound of every node."),
        epilog=AUDIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(a)
    add_test_set_arguments(a, 1000, "audit the first N test images (default 1000)")
    a.add_argument("--steps", type=int, default=30, help="attack steps per run (default 30)")
    a.add_argument("--restarts", type=int, default=1, help="random restarts of PGD (default 1)")
    a.add_argument("--batch-size", type=int, default=250, help="images per batch (default 250)")
    a.add_argument("--json", action="store_true",
                   help="print JSON: violations, vra, empirical_robust_accuracy, k_tightness, nodes, ...")
    a.add_argument("--plot", default=None, metavar="PNG", help="draw VRA and empirical robust accuracy against eps")
    add_capture_argument(a)
    a.set_defaults(func=cmd_audit)
