"""The compiler's acceptance contract, one class of false certificate at a time (issue 8).

Each test is a model that used to be accepted with a wrong bound (or a raw traceback) and must
now be bounded soundly or refused with a CertifyFxError naming the node.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import certify_fx as cfx
from certify_fx import nn as cnn
from certify_fx.certificates import round_up
from conftest import empirical_margin_lipschitz, exact_margin_norms, jacobian_rows


class Fn(nn.Module):
    """A model computing ``fn(self, x)`` with a dense layer ``fc`` (4 -> 3) available."""

    def __init__(self, fn, inputs: int = 4) -> None:
        super().__init__()
        self.fn, self.fc = fn, nn.Linear(inputs, 3)

    def forward(self, x):
        return self.fn(self, x)


def assert_bound_dominates_jacobian(model, shape):
    b = cfx.bound(model.eval(), shape, estimate_steps=0)
    exact = exact_margin_norms(jacobian_rows(model, shape))
    assert b.sound and (b.margin >= exact * (1 - 1e-6)).all()
    return b


# -- 1. tuple-valued ops are input-dependent ------------------------------------------------------
def test_chunk_result_is_bounded_not_frozen():
    model = Fn(lambda s, x: F.pad(x[:, :2], (0, 1)) + 10 * s.fc(torch.cat(x.chunk(2, 1)[1:] * 2, 1)))
    b = assert_bound_dominates_jacobian(model, (4,))
    assert b.max_margin > 5  # the exact constant is large: the 10x branch counts


def test_max_values_are_bounded_and_indices_refused():
    assert_bound_dominates_jacobian(Fn(lambda s, x: s.fc(3 * torch.sort(x, 1).values)), (4,))
    with pytest.raises(cfx.UnsupportedNodeError, match="indices"):
        cfx.bound(Fn(lambda s, x: s.fc(x + torch.max(x, 1, keepdim=True)[1])), (4,))


def test_attention_and_lstm_blocks_are_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.fc = nn.MultiheadAttention(4, 1, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc((x + self.att(x, x, x)[0]).mean(1))

    with pytest.raises(cfx.NotLipschitzError, match="attention"):
        cfx.bound(Block().eval(), (5, 4))


# -- 2. every argument counts -----------------------------------------------------------------
def test_sub_alpha_is_not_dropped():
    b = assert_bound_dominates_jacobian(Fn(lambda s, x: s.fc(torch.sub(x, x, alpha=3))), (4,))
    method = assert_bound_dominates_jacobian(Fn(lambda s, x: s.fc(x.sub(x, alpha=3))), (4,))
    assert b.max_margin > 0 and method.max_margin > 0


@pytest.mark.parametrize("fn,argument", [
    (lambda s, x: s.fc(torch.clamp(x, min=10 * x)), "min"),
    (lambda s, x: s.fc(torch.clip(x, max=-4 * x)), "max"),
    (lambda s, x: F.linear(x, s.fc.weight, bias=3 * x[:, :3]), "bias"),
])
def test_input_dependent_arguments_a_rule_does_not_bound_are_refused(fn, argument):
    with pytest.raises(cfx.UnsupportedNodeError, match=f"argument '{argument}' depends on the input"):
        cfx.bound(Fn(fn).eval(), (4,))


@pytest.mark.parametrize("fn,match", [
    (lambda s, x: s.fc(x.to(torch.int32).float()), "int32"),
    (lambda s, x: s.fc(x.half().float()), "float16"),
    (lambda s, x: s.fc(x.bfloat16().float()), "bfloat16"),
    (lambda s, x: s.fc(x.view(torch.int32).float()), "int32"),
    (lambda s, x: s.fc(F.dropout(x, 0.5)), "training mode"),
    (lambda s, x: s.fc(F.softmax(x, dim=0)), "batch"),
    (lambda s, x: s.fc(x - torch.amax(x)), "every dimension"),
    (lambda s, x: s.fc(F.celu(x, -1.0)), "alpha"),
])
def test_casts_random_ops_and_batch_mixing_are_refused(fn, match):
    with pytest.raises(cfx.UnsupportedNodeError, match=match):
        cfx.bound(Fn(fn).eval(), (4,))


def test_softplus_threshold_jump_is_refused():
    model = nn.Sequential(nn.Softplus(threshold=0.0), nn.Linear(4, 3)).eval()
    with pytest.raises(cfx.UnsupportedNodeError, match="jumps"):
        cfx.bound(model, (4,))
    assert cfx.bound(nn.Sequential(nn.Softplus(), nn.Linear(4, 3)).eval(), (4,)).sound


# -- 3. constants cached by value, not by node name ---------------------------------------------
def test_two_norm_acts_on_one_input_keep_their_own_scales():
    from timm.layers import BatchNormAct2d

    class Dual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = BatchNormAct2d(2), BatchNormAct2d(2)
            self.fc = nn.Linear(2 * 3 * 3, 3)

        def forward(self, x):
            return self.fc((self.a(x) + self.b(x)).flatten(1))

    model = Dual().eval()
    with torch.no_grad():
        model.a.weight.fill_(0.01)
        model.b.weight.fill_(50.0)
    b = cfx.bound(model, (2, 3, 3), estimate_steps=0)
    lower = empirical_margin_lipschitz(model.double(), (2, 3, 3), 0, 1)
    assert b.margin[0, 1].item() >= lower


# -- 4. hooks ------------------------------------------------------------------------------------
def test_forward_hooks_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    handle = model[2].register_forward_hook(lambda m, i, o: o * 100)
    with pytest.raises(cfx.UnsupportedNodeError, match="forward hook"):
        cfx.bound(model, (4,))
    handle.remove()
    handle = model.register_forward_pre_hook(lambda m, i: (i[0] * 100,))
    with pytest.raises(cfx.UnsupportedNodeError, match="pre-hook"):
        cfx.bound(model, (4,))
    handle.remove()
    assert cfx.bound(model, (4,)).sound


def test_a_hook_inside_a_leaf_module_is_refused():
    block = cnn.LiResNetBlock(2)
    block.conv.register_forward_hook(lambda m, i, o: o * 100)
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    with pytest.raises(cfx.UnsupportedNodeError, match="submodule 'conv'"):
        cfx.bound(model, (2, 4, 4))


# -- 5. in-place ops -------------------------------------------------------------------------------
def test_inplace_write_read_again_is_refused():
    def absolute(s, x):
        y = x * 1.0
        positive = y.relu_()  # y now holds relu(x)
        return s.fc(positive + (-y).relu())  # reads the written y: |x| in reality, not relu(x) + relu(-x)

    with pytest.raises(cfx.UnsupportedNodeError, match="in-place"):
        cfx.bound(Fn(absolute).eval(), (4,))


def test_torchvision_resnet_with_inplace_relu_bounds_soundly():
    model = torchvision.models.resnet18(num_classes=4).eval()
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    b = cfx.bound(model, (3, 32, 32), estimate_steps=0)
    lower = empirical_margin_lipschitz(model.double(), (3, 32, 32), 0, 1, restarts=1, steps=10)
    assert b.sound and b.margin[0, 1].item() >= lower


# -- 6. numbers fail closed --------------------------------------------------------------------------
def test_nan_weight_in_an_unused_row_certifies_nothing():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight[2, 0] = float("nan")
    b = cfx.bound(model, (4,), estimate_steps=0)
    assert not b.sound and not b.finite
    with pytest.raises(cfx.CertifyFxError):
        cfx.certify(model, torch.rand(8, 4), 0.1, bound=b)
    pred, radius = cfx.certified_radius(torch.randn(8, 3), b.margin)
    assert (radius == 0).all()


def test_tiny_constants_stay_in_float64_and_never_give_infinite_radii():
    margin = torch.full((3, 3), 1e-50, dtype=torch.float64).fill_diagonal_(0)
    _, radius = cfx.certified_radius(torch.tensor([[1.0, 0.0, -1.0]]), margin)
    assert torch.isfinite(radius).all() and radius.item() > 1e40
    assert cfx.bound(nn.Sequential(nn.Linear(4, 3)).eval(), (4,)).margin.dtype == torch.float64


def test_bound_rounds_up_when_cast_for_the_bottom_logit():
    margin = torch.tensor([[0.0, 1.0 + 1e-12], [1.0 + 1e-12, 0.0]], dtype=torch.float64)
    rounded = round_up(margin, torch.float32)
    assert (rounded.double() >= margin).all()


def test_low_precision_logits_are_refused():
    with pytest.raises(cfx.CertifyFxError, match="bfloat16"):
        cfx.certified_radius(torch.randn(4, 3).bfloat16(), torch.ones(3, 3))
    model = nn.Sequential(nn.Linear(4, 3)).eval().half()
    with pytest.raises(cfx.CertifyFxError, match="float16"):
        cfx.bound(model, (4,))


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf"), "x"])
def test_eps_must_be_finite_and_nonnegative(eps):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(cfx.CertifyFxError):
        cfx.certify(model, torch.rand(2, 4), eps)


def test_ties_never_certify():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1.0)
    cert = cfx.certify(model, torch.rand(5, 4), 0.0)
    assert not cert.certified.any()


# -- 7. stale or mismatched bounds ----------------------------------------------------------------
def test_a_bound_is_tied_to_shape_weights_structure_and_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3))
    model.eval()
    b = cfx.bound(model, (1, 4, 4))
    x = torch.rand(4, 1, 4, 4)
    cfx.certify(model, x, 0.1, bound=b)
    with pytest.raises(cfx.StaleBoundError, match="shape"):
        cfx.certify(model, torch.rand(4, 1, 8, 8), 0.1, bound=b)
    model[0].weight.data.mul_(10)  # a write that bumps no version counter
    with pytest.raises(cfx.StaleBoundError, match="weights"):
        cfx.certify(model, x, 0.1, bound=b)
    b = cfx.bound(model, (1, 4, 4))
    model[2] = nn.Linear(32, 3)
    with pytest.raises(cfx.StaleBoundError, match="structure"):
        cfx.certify(model.eval(), x, 0.1, bound=b)


def test_gloro_follows_data_writes_replaced_modules_and_input_shape():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    gloro = cfx.GloRo(model, eps=0.1, input_shape=(1, 4, 4)).eval()
    k = gloro.lipschitz_bound().max_margin
    model[1].weight.data.mul_(2)
    assert gloro.lipschitz_bound().max_margin == pytest.approx(2 * k, rel=1e-6)
    model[1] = nn.Linear(16, 3)
    assert gloro.lipschitz_bound().max_margin == pytest.approx(cfx.bound(model, (1, 4, 4)).max_margin)
    with pytest.raises(cfx.StaleBoundError):
        gloro(torch.rand(2, 1, 8, 8))


def test_gloro_predict_certifies_with_the_proven_bound_in_training_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    gloro = cfx.GloRo(model, eps=0.05, input_shape=(1, 4, 4))
    x = torch.rand(32, 1, 4, 4)
    trained = gloro.train().predict(x)
    evaluated = gloro.eval().predict(x)
    assert torch.equal(trained, evaluated)


# -- 8. errors are one CertifyFxError naming the node ----------------------------------------------
def test_former_raw_errors_are_handled():
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(15, 3)).eval()
    assert_bound_dominates_jacobian(conv1d, (2, 5))
    assert cfx.bound(Fn(lambda s, x: s.fc(F.relu(input=x))).eval(), (4,)).sound
    assert cfx.bound(Fn(lambda s, x: s.fc(torch.clamp(input=x, min=0.0))).eval(), (4,)).sound
    assert cfx.bound(Fn(lambda s, x: s.fc(x + torch.ones(1, 4).expand_as(x))).eval(), (4,)).sound
    with pytest.raises(cfx.UnsupportedNodeError, match="dropout"):
        cfx.bound(nn.Sequential(nn.Dropout(1.0), nn.Linear(4, 3)), (4,))


@pytest.mark.slow
def test_timm_dpn68_bounds_soundly():
    model = timm.create_model("dpn68", num_classes=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(-2, 2)
    b = cfx.bound(model, (3, 32, 32), estimate_steps=0)
    lower = empirical_margin_lipschitz(model.double(), (3, 32, 32), 0, 1, restarts=1, steps=10)
    assert b.sound and b.margin[0, 1].item() >= lower


def test_batch_mixing_hidden_by_a_shape_coincidence_is_refused():
    class Mixer(nn.Module):  # reshape(x.shape[1], -1): the batch only while batch == channels == 2
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x.reshape(x.shape[1], -1))

    with pytest.raises(cfx.UnsupportedNodeError, match="batch"):
        cfx.bound(Mixer().eval(), (2, 4))
