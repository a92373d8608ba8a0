"""A certificate is about the function the user runs (issue 18).

Wrappers are unwrapped, bounding leaves the model exactly as it was (`bound`, `certify`,
`convert`), a bound reused after `model.train()` says the mode changed, CRC radii keep the
rounding slack, and a recorded model spec cannot make timm load files. The property suite
(tests/test_properties.py) draws subclasses of every leaf type, blocks with every conv variant,
values from the batch size and stateful forwards.
"""

import copy

import pytest
import timm
import torch
from torch import nn

import certify_fx as cfx
from certify_fx.bounds.module_state import ModuleState
from certify_fx.certificates import rounding_slack
from certify_fx.certificates.crc import curvature_bound, curvature_radius
from certify_fx.model_spec import ModelSpec
from certify_fx.models.lipconvnet import LipConvnet


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()


def state_of(model: nn.Module) -> dict:
    """Every attribute of every module: tensors by value, the rest by identity and repr."""
    out = {}
    for path, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, dict) and key in ("_parameters", "_buffers", "_modules"):
                for name, item in value.items():
                    out[f"{path}.{key}.{name}"] = (id(item), item.detach().clone() if isinstance(item, torch.Tensor)
                                                   else None)
            else:
                plain = not isinstance(value, torch.Tensor)
                out[f"{path}.{key}"] = (id(value), repr(value) if plain else value.clone())
    return out


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), set(before) ^ set(after)
    for key, (ident, value) in before.items():
        assert after[key][0] == ident, key
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key][1]), key
        else:
            assert value == after[key][1], key


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrappers_are_bounded_as_the_module_they_run(wrap):
    model = small_net()
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    expected = cfx.bound(model, (3, 8, 8), estimate_steps=0)
    b = cfx.bound(wrapped, (3, 8, 8), estimate_steps=0)
    assert torch.equal(b.margin, expected.margin)
    cert = cfx.certify(wrapped, torch.rand(4, 3, 8, 8), 0.01, bound=b)  # the same fingerprint
    assert cert.radius.shape == (4,)


def test_bound_certify_and_convert_leave_the_model_as_it_was():
    model = timm.create_model("resnet18", num_classes=5, in_chans=1).eval()
    before = state_of(model)
    b = cfx.bound(model, (1, 32, 32), estimate_steps=0)
    assert_same_state(before, state_of(model))
    cfx.certify(model, torch.rand(2, 1, 32, 32), 0.01, bound=b)
    assert_same_state(before, state_of(model))
    cfx.convert(model, "liresnet", input_shape=(1, 32, 32))
    assert_same_state(before, state_of(model))


def test_module_state_restores_what_a_forward_wrote():
    model = small_net()
    model.notes = {"calls": 0}
    state = ModuleState(model)
    with torch.no_grad():
        model[0].weight.mul_(2)
    model[0].cache = torch.ones(1)
    model.notes["calls"] += 1
    model[1] = nn.Tanh()
    assert set(state.changes()) == {"0.weight", "0.cache", "notes", "1"}
    state.restore()
    assert state.changes() == [] and isinstance(model[1], nn.ReLU) and model.notes == {"calls": 0}


def test_a_mode_change_is_not_called_a_weight_change():
    model = small_net()
    b = cfx.bound(model, (3, 8, 8), estimate_steps=0)
    model.train()
    with pytest.raises(cfx.StaleBoundError, match="mode") as info:
        cfx.certify(model, torch.rand(2, 3, 8, 8), 0.1, bound=b)
    assert "weights changed" not in str(info.value)


def test_crc_radii_keep_the_rounding_slack():
    """The CRC radius is the distance to where the exact margin falls to the logits' rounding
    slack, not to 0 (as the Lipschitz radius subtracts the slack from the gap): at a near-tie it is
    strictly smaller than the distance to the exact boundary."""
    torch.manual_seed(0)
    model = LipConvnet(3, depth=5, width=4, in_chans=1, img_size=28, pool="projection", head="mlp").eval()
    x = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        logits = model(x)
        pred, other = int(logits.argmax()), int(logits[0].argsort()[-2])
        slack = float(rounding_slack(logits, logits.argmax(1))[0, other])
        gap = float(logits[0, pred] - logits[0, other])
        model.head.fc2.bias[other] += gap - 3 * slack  # the gap is now 3 slacks
    cert = cfx.certify(model, x, 0.0, method="crc", crc_classes=1)
    bound = curvature_bound(model, (1, 28, 28))
    with torch.no_grad():
        features = model.forward_features(x).flatten(1)
    exact_boundary = curvature_radius(model.head, features, torch.tensor([pred]), bound.lower, bound.upper,
                                      torch.tensor([[other]]))[0, 0] / bound.features
    assert 0 < float(cert.radius[0]) < float(exact_boundary)


def test_a_model_spec_cannot_make_timm_load_files(tmp_path):
    for kwargs in ({"checkpoint_path": str(tmp_path / "x.pth")}, {"pretrained": True},
                   {"pretrained_cfg_overlay": {"file": "x"}}):
        with pytest.raises(cfx.CertifyFxError, match="architecture arguments only"):
            ModelSpec("timm", "resnet18", None, kwargs).build()
    assert isinstance(ModelSpec("timm", "resnet18", None, {"num_classes": 3}).build(), nn.Module)
    copy.deepcopy(ModelSpec("timm", "resnet18", None, {}))
