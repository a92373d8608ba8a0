"""Weights saved beside other things (a training script's checkpoint dict): --weights-key picks them."""

import json

import pytest
import torch
from torch import nn

import certify_fx as cfx
from certify_fx.errors import CheckpointError
from conftest import run_cli

NET = """
import torch
from torch import nn


class Net(nn.Module):  # a user's own classifier, as another code base writes it
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))
"""


def _net(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    return cfx.load_model(f"{tmp_path / 'net.py'}:Net").model


def test_weights_under_an_entry_or_a_prefix_load_strictly(tmp_path):
    model = _net(tmp_path)
    trained = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"backbone": trained, "optimizer": {"lr": torch.tensor(0.1)}, "epoch": 7}, tmp_path / "run.pth")
    torch.save({"ema": {"model": trained}}, tmp_path / "nested.pth")
    torch.save({f"model.{k}": v for k, v in trained.items()}, tmp_path / "prefixed.pth")
    for file, key in [("run.pth", "backbone"), ("nested.pth", "ema/model"), ("prefixed.pth", "model")]:
        loaded = cfx.load_model(f"{tmp_path / 'net.py'}:Net", weights=tmp_path / file, weights_key=key)
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in trained.items()), file
    with pytest.raises(CheckpointError, match="no weights under 'head'.*backbone.*optimizer"):
        cfx.load_model(f"{tmp_path / 'net.py'}:Net", weights=tmp_path / "run.pth", weights_key="head")
    with pytest.raises(CheckpointError, match="holds no state_dict"):  # without the key: no single state_dict
        cfx.load_model(f"{tmp_path / 'net.py'}:Net", weights=tmp_path / "run.pth")


def test_the_command_line_bounds_a_model_whose_weights_sit_under_a_key(tmp_path):
    model = _net(tmp_path)
    torch.save({"backbone": model.state_dict(), "epoch": 1}, tmp_path / "run.pth")
    done = run_cli("bound", f"{tmp_path / 'net.py'}:Net", "--input-size", "1,4,4", "--weights", tmp_path / "run.pth",
                   "--weights-key", "backbone", "--trust-source", "--json", "--estimate-steps", "0")
    assert done.returncode == 0, done.stderr[-1500:]
    expected = cfx.bound(model.eval(), (1, 4, 4), estimate_steps=0).max_margin
    assert json.loads(done.stdout)["max_margin"] == pytest.approx(expected, rel=1e-12)
    wrong = run_cli("bound", f"{tmp_path / 'net.py'}:Net", "--input-size", "1,4,4", "--weights", tmp_path / "run.pth",
                    "--weights-key", "head", "--trust-source")
    assert wrong.returncode == 2 and "no weights under 'head'" in wrong.stderr and len(wrong.stderr.splitlines()) == 1


def test_nn_module_is_unchanged_when_no_key_is_needed(tmp_path):
    model = nn.Linear(2, 2)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    other = cfx.load_weights(nn.Linear(2, 2), tmp_path / "plain.pt")
    assert torch.equal(other.weight, model.weight)
