"""Weights as safetensors: converted models and exported checkpoints, read back without pickle."""

import subprocess
import sys
from pathlib import Path

import timm
import torch

import certify_fx as cfx
from certify_fx.loading import export_model
from certify_fx.weights import read_safetensors

BIN = Path(sys.executable).parent


def test_a_converted_model_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = cfx.convert(timm.create_model("resnet18", num_classes=10, in_chans=1), input_shape=(1, 28, 28)).eval()
    path = tmp_path / "fm.safetensors"
    cfx.save_converted(model, path, cfx.ModelSpec.parse("resnet18", {"num_classes": 10, "in_chans": 1}))
    tensors, records = read_safetensors(path)
    assert records["format"] == "certify-fx/converted" and records["conversion"]["to"] == "liresnet"
    assert tensors.keys() == model.state_dict().keys()
    again = cfx.load_converted(path).eval()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(again(x), model(x))
    loaded = cfx.load_model(path)
    assert loaded.kind == "converted" and loaded.input_shape == (1, 28, 28)


def test_export_writes_weights_a_model_name_can_load(tmp_path):
    loaded = cfx.load_model("liresnet_l4w32", kwargs={"num_classes": 3, "img_size": 16, "neck_dim": 32})
    path = tmp_path / "w.safetensors"
    message = export_model(loaded, path)
    assert "--kwarg num_classes=3" in message and "--weights" in message
    again = cfx.load_model("liresnet_l4w32", kwargs={"num_classes": 3, "img_size": 16, "neck_dim": 32}, weights=path)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(again.model(x), loaded.model(x))


def test_convert_and_export_on_the_command_line(tmp_path):
    out = tmp_path / "c.safetensors"
    cli = str(BIN / "certify-fx")
    done = subprocess.run([cli, "convert", "resnet18", "--num-classes", "4", "--input-size", "3,32,32", "-o", str(out),
                           "--no-bound"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([cli, "export", str(out), "-o", str(tmp_path / "again.safetensors")], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "converted model" in done.stdout, done.stderr
    done = subprocess.run([cli, "bound", str(tmp_path / "again.safetensors"), "--json", "--estimate-steps", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and '"sound": true' in done.stdout, done.stderr
