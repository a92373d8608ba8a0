"""Train what you convert: model specs, the one loader, recipes that convert, the extension path."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import certify_fx as cfx
from certify_fx.errors import CertifyFxError, CheckpointError, RecipeError
from certify_fx.train import load_checkpoint, load_recipe

from conftest import BIN, CLI_ENV, ROOT, run_cli

SMOKE_CONVERT = ROOT / "recipes" / "smoke_convert.yaml"
TINY = {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "stem_width": 8, "in_chans": 1, "num_classes": 4}


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:") and result.stderr.strip().count("\n") == 0, result.stderr
    return result.stderr


# -- model specs and the loader -------------------------------------------------------------------
NET_PY = """
import torch.nn as nn

class Net(nn.Sequential):
    def __init__(self, num_classes=3):
        super().__init__(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, num_classes))
"""


def test_model_spec_parses_every_kind(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    spec = cfx.ModelSpec.parse(str(tmp_path / "net.py") + ":Net", {"num_classes": 5})
    assert spec.kind == "file" and Path(spec.target).is_absolute() and spec.attr == "Net"
    assert cfx.ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.build(trust_source=True)[-1].out_features == 5
    with pytest.raises(CertifyFxError, match="trust_source"):
        spec.build()
    assert cfx.ModelSpec.parse("torchvision.models:resnet18").kind == "module"
    assert cfx.ModelSpec.parse("liresnet_l6w32").is_certify_fx_family
    with pytest.raises(CertifyFxError, match="did you mean resnet18"):
        cfx.ModelSpec.parse("resnet_18")
    with pytest.raises(CertifyFxError, match="no such file"):
        cfx.ModelSpec.parse("./missing.py:Net")


def test_file_model_round_trips_through_convert_and_bound(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    result = run_cli("convert", "./net.py:Net", "--input-size", "4", "--to", "lipschitz", "-o", "n.pt", "--no-bound",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "--trust-source" in _one_line_error(run_cli("bound", tmp_path / "n.pt", "--json", cwd=elsewhere))
    result = run_cli("bound", tmp_path / "n.pt", "--trust-source", "--json", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sound"] and data["input_shape"] == [4] and data["num_classes"] == 3


def test_one_loader_reads_every_file_certify_fx_writes(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18", **TINY).eval()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    x = torch.rand(3, 1, 16, 16)
    for weights in ("w.safetensors", "w.pth"):
        loaded = cfx.load_model("resnet18", kwargs=TINY, weights=tmp_path / weights)
        assert loaded.kind == "spec" and torch.equal(loaded.model(x), source(x))
    converted = cfx.convert(source, to="liresnet", input_shape=(1, 16, 16))
    cfx.save_converted(converted.eval(), tmp_path / "c.pt", cfx.ModelSpec.parse("resnet18", TINY))
    loaded = cfx.load_model(tmp_path / "c.pt")
    assert loaded.kind == "converted" and loaded.input_shape == (1, 16, 16) and loaded.conversion["to"] == "liresnet"
    assert torch.allclose(loaded.model(x), converted(x), atol=1e-6)
    # strict: another architecture's weights name the missing and unexpected keys
    with pytest.raises(CheckpointError, match=r"do not fit ResNet: missing 12"):
        cfx.load_model("resnet18", kwargs={**TINY, "layers": [2, 1, 1, 1]}, weights=tmp_path / "w.pth")
    # a pickled module is not loaded, and says what to do instead
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"pickled Python object .*state_dict"):
        cfx.load_model(tmp_path / "module.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        cfx.load_model(tmp_path / "garbage.pt")
    with pytest.raises(CertifyFxError, match="--weights"):
        cfx.load_model(tmp_path / "w.pth")


def test_convert_cli_takes_model_kwargs_and_source_weights(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18", **TINY).eval()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    kwargs = ["--kwarg", "layers=[1,1,1,1]", "--kwarg", "channels=[8,8,16,16]", "--kwarg", "stem_width=8"]
    result = run_cli("convert", "resnet18", "--in-chans", "1", "--num-classes", "4", *kwargs, "--input-size", "1,16,16",
                  "--weights", tmp_path / "w.safetensors", "-o", tmp_path / "c.pt", "--no-bound")
    assert result.returncode == 0, result.stderr
    rebuilt = cfx.load_model(tmp_path / "c.pt").model
    reference = cfx.convert(source, to="liresnet", input_shape=(1, 16, 16)).eval()
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(rebuilt(x), reference(x), atol=1e-6)


def test_input_shape_with_a_batch_dimension_is_explained():
    model = timm.create_model("resnet18", **TINY).eval()
    with pytest.raises(CertifyFxError, match=r"without batch: \(1, 16, 16\)"):
        cfx.bound(model, (1, 1, 16, 16))


# -- conversion starts trainable --------------------------------------------------------------------
def test_converted_vit_logits_depend_on_the_image():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10,
                            depth=2).eval()
    model = cfx.convert(vit, to="lipschitz-vit", input_shape=(1, 28, 28))
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    logits = model(x)
    logits.sum().backward()
    assert x.grad.abs().max() > 1e-6
    assert (logits - logits[0]).abs().max() > 1e-6
    assert any("mean attention map" in r.after for r in model.rewrite_log)


def test_rescaling_keeps_predictions_and_tames_the_bound():
    torch.manual_seed(0)
    source = timm.create_model("resnetv2_50", num_classes=10, layers=[1, 1, 1, 1]).eval()
    raw = cfx.convert(source, to="liresnet", input_shape=(3, 32, 32), rescale=False).eval()
    scaled = cfx.convert(source, to="liresnet", input_shape=(3, 32, 32)).eval()
    x = torch.rand(16, 3, 32, 32)
    assert torch.equal(raw(x).argmax(1), scaled(x).argmax(1))
    k_raw = cfx.bound(raw, (3, 32, 32), estimate_steps=0).margin.max()
    k_scaled = cfx.bound(scaled, (3, 32, 32), estimate_steps=0).margin.max()
    assert k_scaled < 10 and k_scaled < k_raw
    assert any(r.pass_name == "rescale_layers" for r in scaled.rewrite_log)


def test_zero_initialised_heads_are_reinitialised():
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    mixer = MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32).eval()
    model = cfx.convert(mixer, to="lipschitz-vit", input_shape=(3, 32, 32))
    assert cfx.bound(model, (3, 32, 32), estimate_steps=0).margin.max() > 0
    logits = model(torch.rand(4, 3, 32, 32))
    assert (logits - logits[0]).abs().max() > 0


# -- the extension path ------------------------------------------------------------------------------
class Doubler(nn.Module):
    """A user's layer with Python control flow inside (not traceable), 2-Lipschitz."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.detach().abs().sum()) >= 0:  # data-dependent branch: fx cannot trace into this
            return 2 * x
        return x


def test_a_registered_module_is_a_leaf_for_bound_certify_convert_and_gloro():
    from certify_fx.bounds import registry
    from certify_fx.bounds.operators import Scale

    @cfx.register_module_rule(Doubler)
    def doubler(ev, module, input):
        return ev.linear(input, Scale(input.shape, torch.tensor(2.0)))

    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), Doubler(), nn.ReLU(), nn.Linear(8, 3)).eval()
        b = cfx.bound(net, (4,), estimate_steps=0)
        assert b.sound
        # the bound holds against the margin gradients at random points (the layer counts twice)
        x = torch.randn(200, 4, requires_grad=True)
        logits = net(x)
        for i in range(3):
            for j in range(3):
                if i != j:
                    (grad,) = torch.autograd.grad((logits[:, i] - logits[:, j]).sum(), x, retain_graph=True)
                    assert grad.norm(dim=1).max() <= b.margin[i, j] * (1 + 1e-9)
        halved = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        halved.load_state_dict({k.replace("3.", "2."): v for k, v in net.state_dict().items()})
        assert b.margin.max() > cfx.bound(halved, (4,), estimate_steps=0).margin.max()
        cert = cfx.certify(net, torch.rand(5, 4), eps=0.01, bound=b)
        assert cert.radius.shape == (5,)
        converted = cfx.convert(net, to="lipschitz", input_shape=(4,))
        assert any(isinstance(m, Doubler) for m in converted.modules())
        gloro = cfx.GloRo(converted, eps=0.01, input_shape=(4,))
        assert gloro(torch.rand(2, 4)).shape == (2, 4)
    finally:
        registry.MODULE_RULES.pop(Doubler, None)
    with pytest.raises(cfx.TraceError):  # without the rule the tracer goes inside, and fails
        cfx.bound(nn.Sequential(nn.Linear(4, 8), Doubler()), (4,))


# -- recipes that convert ----------------------------------------------------------------------------
def test_recipe_model_section_is_checked():
    with pytest.raises(RecipeError, match="model.convert"):
        load_recipe(SMOKE_CONVERT, ["model.convert=lipshitz"])
    with pytest.raises(RecipeError, match="model.convert_options.activaton"):
        load_recipe(SMOKE_CONVERT, ["model.convert_options={activaton: minmax}"])


@pytest.fixture(scope="module")
def converted_run(tmp_path_factory):
    """The converting smoke recipe from safetensors source weights, uninterrupted, one process."""
    out = tmp_path_factory.mktemp("convert_single")
    torch.manual_seed(1)
    source = timm.create_model("resnet18", **TINY)
    save_file(source.state_dict(), str(out / "source.safetensors"))
    result = run_cli("train", SMOKE_CONVERT, "--set", f"output_dir={out / 'run'}",
                  "--set", f"model.checkpoint={out / 'source.safetensors'}")
    assert result.returncode == 0, result.stderr
    return out


def test_converted_recipe_trains_in_two_gloo_processes_like_one(converted_run, tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "certify_fx", "train",
           str(SMOKE_CONVERT), "--set", f"output_dir={out}",
           "--set", f"model.checkpoint={converted_run / 'source.safetensors'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=CLI_ENV, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_checkpoint(converted_run / "run" / "checkpoint.pt")["model"]
    two = load_checkpoint(out / "checkpoint.pt")["model"]
    assert max((one[k].double() - two[k].double()).abs().max().item() for k in one) < 1e-4


def test_converted_recipe_resumes_after_a_kill_and_certifies_from_a_fresh_process(converted_run, tmp_path):
    out = tmp_path / "killed"
    source = converted_run / "source.safetensors"
    proc = subprocess.Popen([str(BIN / "certify-fx"), "train", str(SMOKE_CONVERT), "--set", f"output_dir={out}",
                             "--set", f"model.checkpoint={source}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CLI_ENV, cwd=ROOT)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert killed_at < load_recipe(SMOKE_CONVERT).epochs, "the run finished before it could be killed"
    source.rename(source.with_suffix(".moved"))  # resuming needs only the run's own checkpoint
    try:
        result = run_cli("train", "--resume", out / "checkpoint.pt")
    finally:
        source.with_suffix(".moved").rename(source)
    assert result.returncode == 0, result.stderr
    a = load_checkpoint(out / "checkpoint.pt")["model"]
    b = load_checkpoint(converted_run / "run" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    result = run_cli("certify", out / "checkpoint.pt", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    history = load_checkpoint(out / "checkpoint.pt")["history"]
    assert summary["sound"] and summary["count"] == 128
    assert summary["clean_accuracy"] == history[-1]["clean_accuracy"]
    assert summary["vra"] == history[-1]["vra"]
    loaded = cfx.load_model(out / "checkpoint.pt")
    assert loaded.kind == "checkpoint" and loaded.conversion["to"] == "liresnet" and loaded.recipe.epochs == 3


def test_bad_source_weights_are_one_clear_line(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    result = run_cli("train", SMOKE_CONVERT, "--set", f"output_dir={tmp_path / 'run'}",
                  "--set", f"model.checkpoint={tmp_path / 'bad.pt'}")
    assert "do not fit" in _one_line_error(result) and "missing" in result.stderr


# -- factored bottlenecks ------------------------------------------------------------------------------
def test_linear_bottleneck_bound_is_exact_and_sound():
    from certify_fx.nn import LinearBottleneck

    torch.manual_seed(0)
    block = LinearBottleneck([nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 1)]).eval()
    shape = (8, 6, 6)
    b = cfx.bound(nn.Sequential(block, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3)), shape, estimate_steps=0)
    assert any(r.op == "conv3x3 8->8" for r in b.nodes)  # the whole block folded into one conv
    jac = torch.autograd.functional.jacobian(lambda v: block(v.view(1, *shape)).flatten(),
                                             torch.zeros(8 * 36, dtype=torch.float32))
    exact = torch.linalg.matrix_norm(jac.double(), 2).item()
    assert exact <= b.penultimate <= exact * 1.01


def test_factored_bottlenecks_keep_the_parameters_and_the_bound():
    from certify_fx.nn import LinearBottleneck

    torch.manual_seed(0)
    source = timm.create_model("resnet50", num_classes=10, layers=[2, 2, 1, 1], channels=[8, 8, 16, 16],
                               stem_width=8).eval()
    shape = (3, 32, 32)
    forms = {f: cfx.convert(source, to="liresnet", input_shape=shape, bottleneck=f, rescale=False).eval()
             for f in ("composed", "factored")}
    params = {f: sum(p.numel() for p in m.parameters()) for f, m in forms.items()}
    assert params["factored"] < params["composed"]
    assert any(isinstance(m, LinearBottleneck) for m in forms["factored"].modules())
    k = {f: cfx.bound(m, shape, estimate_steps=0).margin.max().item() for f, m in forms.items()}
    assert k["factored"] == pytest.approx(k["composed"], rel=1e-5)
    auto = cfx.convert(source, to="liresnet", input_shape=shape, rescale=False)
    assert sum(p.numel() for p in auto.parameters()) == params["factored"]


def test_squeeze_excitation_gates_become_per_channel_scales():
    torch.manual_seed(0)
    model = timm.create_model("seresnet18", **TINY).eval()
    with pytest.raises(cfx.UnsupportedNodeError) as info:
        cfx.bound(model, (1, 16, 16))
    assert "convert(" in str(info.value)  # before conversion the advice is to convert
    converted = cfx.convert(model, to="liresnet", input_shape=(1, 16, 16))
    assert sum(r.pass_name == "replace_gates" for r in converted.rewrite_log) == 4
    assert not any("SEModule" in type(m).__name__ for m in converted.modules())  # gates gone (scales fold into convs)
    b = cfx.bound(converted, (1, 16, 16), estimate_steps=0)
    assert b.sound and b.finite


def test_factored_basic_blocks_compute_and_bound_exactly_the_composed_conv():
    from certify_fx.nn import LinearBottleneck

    torch.manual_seed(0)
    source = timm.create_model("resnet18", **{**TINY, "layers": [2, 2, 1, 1]}).eval()
    shape = (1, 16, 16)
    forms = {f: cfx.convert(source, to="liresnet", input_shape=shape, bottleneck=f, rescale=False).eval()
             for f in ("composed", "auto")}
    blocks = [m for m in forms["auto"].modules() if isinstance(m, LinearBottleneck)]
    assert blocks and all(len(b.branch) == 2 and b.branch[1].padding == (0, 0) for b in blocks)
    assert sum(p.numel() for p in forms["auto"].parameters()) < sum(p.numel() for p in forms["composed"].parameters())
    x = torch.rand(5, *shape)
    torch.testing.assert_close(forms["auto"](x), forms["composed"](x), rtol=1e-4, atol=1e-5)
    k = {f: cfx.bound(m, shape, estimate_steps=0).margin for f, m in forms.items()}
    torch.testing.assert_close(k["auto"], k["composed"], rtol=1e-5, atol=0)


def test_a_model_converted_with_composed_basic_blocks_still_loads(tmp_path):
    """Files written before basic blocks were factored and kernels trimmed (one 5x5 conv per block) load."""
    from certify_fx.model_record import ModelRecord

    source = timm.create_model("resnet18", **{**TINY, "layers": [2, 1, 1, 1]}).eval()
    older = cfx.convert(source, to="liresnet", input_shape=(1, 16, 16), bottleneck="composed", trim=False)
    record = ModelRecord(cfx.ModelSpec.parse("resnet18").with_kwargs(**{**TINY, "layers": [2, 1, 1, 1]}),
                         {"to": "liresnet", "bottleneck": "auto", "input_shape": [1, 16, 16]}, (1, 16, 16))
    loaded = record.load(older.state_dict())
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), older.eval()(x))


def test_trimming_dead_kernel_taps_keeps_the_function_and_the_bound():
    torch.manual_seed(0)
    source = timm.create_model("resnet18", **{**TINY, "layers": [2, 2, 2, 2]}).eval()
    shape = (1, 16, 16)  # the last stage sees 1x1 maps: a 5x5 kernel there is its centre tap
    full, trimmed = (cfx.convert(source, to="liresnet", input_shape=shape, trim=t, rescale=False).eval()
                     for t in (False, True))
    log = [r for r in trimmed.rewrite_log if r.pass_name == "trim_kernels"]
    assert log and not any(r.changes_function for r in log)
    assert sum(p.numel() for p in trimmed.parameters()) < sum(p.numel() for p in full.parameters())
    x = torch.rand(6, *shape)
    torch.testing.assert_close(trimmed(x), full(x), rtol=1e-4, atol=1e-5)
    k = [cfx.bound(m, shape, estimate_steps=0).margin for m in (full, trimmed)]
    torch.testing.assert_close(k[1], k[0], rtol=1e-4, atol=0)


def test_activation_relu_keeps_the_models_own_activations():
    from certify_fx.nn import MinMax

    source = timm.create_model("resnet18", **TINY).eval()
    converted = cfx.convert(source, to="liresnet", input_shape=(1, 16, 16), activation="relu")
    assert not any(isinstance(m, MinMax) for m in converted.modules())
    assert not any(r.pass_name == "replace_activations" for r in converted.rewrite_log)
    assert cfx.bound(converted, (1, 16, 16), estimate_steps=0).sound
