"""The certify-fx command line, run as a user would (a fresh process)."""

import json
import subprocess
import sys
import textwrap

import pytest


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "certify_fx", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr + proc.stdout)
    return proc


def test_help_teaches():
    out = run("--help").stdout
    assert "bound" in out and "examples:" in out
    out = run("bound", "--help").stdout
    assert "--input-size" in out and "K[i, j]" in out


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--no-such-flag"], ["bound"],
                                  ["certify", "--help"], ["--version"]])
def test_help_and_usage_errors_never_import_torch_or_timm(argv):
    # The console script's module; what it imports before answering is what the user waits for.
    code = textwrap.dedent(f"""
        import sys
        from certify_fx_cli.main import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        heavy = sorted(m for m in ("torch", "timm", "certify_fx", "numpy") if m in sys.modules)
        print("IMPORTED", heavy, file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTED []" in proc.stderr, proc.stderr


def test_bound_timm_name_json():
    data = json.loads(run("bound", "liresnet_l4w32", "--num-classes", "10", "--input-size", "3,32,32",
                          "--json").stdout)
    assert data["sound"] and data["num_classes"] == 10
    assert len(data["margin"]) == 10 and data["margin"][0][0] == 0
    assert any(row["kind"] == "activation" for row in data["nodes"])


def test_bound_file_module_prints_tables(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn
        import torch.nn.functional as F

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3, padding=1)
                self.fc = nn.Linear(4 * 6 * 6, 3)

            def forward(self, x):
                return self.fc(F.relu(self.conv(x)).flatten(1))
    """))
    out = run("bound", f"{path}:Net", "--input-size", "1,6,6").stdout
    assert "margin Lipschitz constants" in out and "relu" in out
    assert "share" in out  # where the time went, per node


def test_bound_errors_are_one_clear_line():
    proc = run("bound", "vit_tiny_patch16_224", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: node 'blocks_0_norm1' (LayerNorm") and "Traceback" not in proc.stderr
    proc = run("bound", "not_a_model_name_at_all", check=False)
    assert proc.returncode == 2 and "unknown model" in proc.stderr


def test_a_refused_user_model_is_one_error_line(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                return self.fc(x.half().float())
    """))
    proc = run("bound", f"{path}:Net", "--input-size", "4", "--trust-source", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: node 'half'"), proc.stderr


def test_convert_then_bound_from_a_fresh_process(tmp_path):
    out = tmp_path / "r18.pt"
    proc = run("convert", "resnet18", "--to", "liresnet", "--num-classes", "10", "--input-size", "3,32,32",
               "-o", str(out))
    assert "linearize_residual_branches" in proc.stdout and "parameters:" in proc.stdout
    assert out.is_file()
    data = json.loads(run("bound", str(out), "--json", "--estimate-steps", "0").stdout)
    assert data["sound"] and data["num_classes"] == 10 and data["input_shape"] == [3, 32, 32]
    # the norms convert proved are read back, not proved again
    assert any(row["method"].endswith("(kept)") for row in data["nodes"])


def test_convert_reports_unsupported_models(tmp_path):
    path = tmp_path / "gated.py"
    path.write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn

        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, padding=1)
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                y = self.conv(x)
                return self.fc((y * torch.sigmoid(y)).mean((2, 3)))
    """))
    proc = run("convert", f"{path}:Gated", "--input-size", "3,8,8", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: node 'mul'")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("bad")
    (root / "garbage.pt").write_bytes(b"\x00\x01 garbage, not a torch file" * 10)
    torch.save(torch.nn.Linear(2, 2), root / "pickled.pt")
    return root


@pytest.mark.parametrize("command", [["certify"], ["bound"], ["convert"], ["train", "--resume"]])
@pytest.mark.parametrize("name, says", [("garbage.pt", "is not a readable torch file"),
                                        ("pickled.pt", "pickled Python object (torch.nn.modules.linear.Linear)")])
def test_bad_files_are_one_error_line_and_exit_2(bad_files, command, name, says):
    proc = run(*command, str(bad_files / name), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr and "KeyError" not in proc.stderr
    if name == "pickled.pt":
        assert "state_dict" in proc.stderr  # says how to save it instead


@pytest.mark.parametrize("override, says", [
    ("loss.options={min_fracton: 0.1}", "unknown recipe key 'loss.options.min_fracton' (did you mean 'min_fraction'?)"),
    ("loss.options={min_fraction: lots}", "recipe key 'loss.options.min_fraction' must be float"),
    ("loss.name=tradse", "(did you mean 'trades'?)"),
    ("optim.lr_min=0", "(did you mean 'min_lr'?)"),
])
def test_recipe_typos_fail_when_the_recipe_loads_in_one_line(tmp_path, override, says):
    proc = run("train", "recipes/smoke.yaml", "--set", override, "--set", f"output_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_plot_without_matplotlib_says_how_to_install_before_certifying(monkeypatch, capsys):
    import importlib.util

    from certify_fx_cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["certify", "liresnet_l4w32", "--data", "synthetic", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'certify-fx[plot]'" in err


def _choice_lists(parser, path=()):
    """(command path, option) -> choices, for every argument of every sub-command with choices."""
    import argparse

    found = {}
    for action in parser._actions:  # argparse keeps its arguments here (no public accessor)
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_choice_lists(sub, path + (name,)))
        elif action.choices is not None:
            found[(path, action.option_strings[0] if action.option_strings else action.dest)] = tuple(action.choices)
    return found


def test_every_cli_choice_list_is_the_library_table():
    """The CLI spells its choices out (so --help starts without torch); each must equal the
    library's table, and a new choice list must be tied to one here."""
    from certify_fx.bounds.capture import CAPTURE_MODES
    from certify_fx.certificates import CERTIFICATE_METHODS
    from certify_fx.losses import LOSSES
    from certify_fx.transforms.convert import CONVERT_OPTIONS, TARGETS
    from cli.main import build_parser

    tables = {"--to": TARGETS, "--method": CERTIFICATE_METHODS, "--capture": CAPTURE_MODES,
              **{"--" + name.replace("_", "-"): o.choices for name, o in CONVERT_OPTIONS.items() if o.choices}}
    found = _choice_lists(build_parser())
    assert found, "no choice lists found"
    for (command, option), choices in found.items():
        assert option in tables, f"{' '.join(command)} {option}: tie its choices to a library table in this test"
        assert choices == tuple(tables[option]), (command, option, choices)
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].description
    assert all(name in train_help for name in LOSSES), "train --help lists every loss"


def test_the_training_docs_list_every_choice_of_the_recipe_tables():
    """docs/training.md spells out each recipe choice list as `a | b | c`: each must be the
    library's table (a new loss or schedule cannot go undocumented)."""
    import re

    from certify_fx.losses import LOSSES
    from certify_fx.schedules import EPS_SCHEDULES, LR_SCHEDULES

    from conftest import ROOT

    text = (ROOT / "docs" / "training.md").read_text()
    listed = {frozenset(s.strip() for s in m.split("|")) for m in re.findall(r"\(([\w ]+(?:\|[\w ]+)+)\)", text)}
    for table in (LOSSES, EPS_SCHEDULES, LR_SCHEDULES):
        assert frozenset(table) in listed, f"docs/training.md lists no ({' | '.join(table)})"
