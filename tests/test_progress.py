"""Progress displays: live bars in a terminal, plain unwrapped lines in logs, stdout kept clean."""

import io
import time

import timm
import torch
from rich.console import Console

import certify_fx as cfx
from certify_fx.progress import LineProgress, progress_display


def _log_console(width=40):
    buffer = io.StringIO()
    return Console(file=buffer, width=width, force_terminal=False), buffer


def test_off_a_terminal_progress_is_plain_periodic_lines_never_wrapped():
    console, buffer = _log_console(width=40)
    with progress_display(console, interval=0.0) as progress:
        assert isinstance(progress, LineProgress)
        task = progress.add_task("epoch 1/3", total=4, info="")
        for step in range(4):
            progress.update(task, advance=1, info=f"loss {1.0 / (step + 1):.4f}  acc 0.5  a long tail of fields " * 2)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("epoch 1/3: ") for line in lines)  # one record per line
    assert "2/4 (50%)" in lines[1] and "ETA" in lines[1] and "elapsed" in lines[3]


def test_lines_come_every_interval_not_every_step():
    console, buffer = _log_console()
    with progress_display(console, interval=3600.0) as progress:
        task = progress.add_task("certify", total=1000)
        for _ in range(1000):
            progress.advance(task)
    assert buffer.getvalue() == ""  # a quick task in a log: no noise


def test_bound_reports_every_node_and_its_json_stays_on_stdout():
    model = timm.create_model("liresnet_l4w32", num_classes=10, img_size=32).eval()
    seen = []

    class Recorder(LineProgress):
        def update(self, task_id, **kw):
            seen.append(kw.get("info"))
            super().update(task_id, **kw)

    console, _ = _log_console()
    with Recorder(console) as progress:
        result = cfx.bound(model, (3, 32, 32), estimate_steps=0, progress=progress)
    graph_nodes = len(cfx.BoundCompiler(model, (3, 32, 32)).graph_module.graph.nodes)
    # each line names the node just bounded (and, after the first second, the slowest so far)
    assert len([s for s in seen if s]) == graph_nodes and seen[-1].split(";")[0] == "output"
    assert torch.equal(result.margin, cfx.bound(model, (3, 32, 32), estimate_steps=0).margin)


def test_a_bound_says_where_its_time_went():
    model = timm.create_model("liresnet_l4w32", num_classes=10, img_size=32).eval()
    start = time.perf_counter()
    result = cfx.bound(model, (3, 32, 32), estimate_steps=0)
    elapsed = time.perf_counter() - start
    assert all(row.seconds >= 0 for row in result.nodes)
    assert 0 < result.seconds <= elapsed  # the rows add up to the evaluation, tracing aside
    slowest = result.slowest(3)
    assert len(slowest) == 3 and slowest[0].seconds >= slowest[1].seconds >= slowest[2].seconds
    assert slowest[0].kind in ("linear", "output")  # time goes to the rows that prove norms


def test_convert_reports_each_pass():
    seen = []

    class Recorder(LineProgress):
        def update(self, task_id, **kw):
            if kw.get("info"):
                seen.append(kw["info"])
            super().update(task_id, **kw)

    console, _ = _log_console()
    with Recorder(console) as progress:
        cfx.convert(timm.create_model("resnet10t", num_classes=10), input_shape=(3, 32, 32), progress=progress)
    assert seen[0] == "fold_batchnorm" or "fold_batchnorm" in seen
    assert "rescale_layers" in seen and seen[-1] == "check_supported"
