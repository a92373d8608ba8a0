"""Soundness: on nonlinear nets the bound is never below what gradient ascent can find."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certify_fx as cfx
from certify_fx.errors import NotLipschitzError, UnsupportedNodeError
from certify_fx.nn import GroupSort, LiResNetBlock, MinMax
from conftest import empirical_margin_lipschitz


class ResidualNet(nn.Module):
    """Residual adds, a strided block with a 1x1 shortcut, overlapping max-pooling, functional ops."""

    def __init__(self, act: str = "relu", c: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.act = {"relu": F.relu, "minmax": MinMax(), "groupsort": GroupSort(4), "gelu": F.gelu}[act]
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.short = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.bn = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.pool(self.act(self.stem(x)))
        x = self.act(x + self.conv2(self.act(self.conv1(x))))
        x = self.act(self.bn(self.down(x) + self.short(x)))
        return self.fc(x.mean((2, 3)))


def _scale_weights(model, factor):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.3, 2.0)
                m.running_mean.normal_()


@pytest.mark.parametrize("act", ["relu", "minmax", "groupsort", "gelu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bound_dominates_gradient_ascent(act, seed):
    torch.manual_seed(seed)
    model = ResidualNet(act).eval()
    _scale_weights(model, 1.5)
    shape = (3, 8, 8)
    result = cfx.bound(model, shape)
    assert result.sound
    model = model.double()
    for i, j in [(0, 1), (2, 4), (3, 0)]:
        found = empirical_margin_lipschitz(model, shape, i, j)
        assert result.margin[i, j].item() >= found * (1 - 1e-6), (i, j, result.margin[i, j].item(), found)
        assert result.margin[i, j] == result.margin[j, i]


def test_liresnet_stack_bound_dominates_ascent():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), MinMax(), LiResNetBlock(8, 3), MinMax(),
                          LiResNetBlock(8, 3), MinMax(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()
    result = cfx.bound(model, (3, 8, 8))
    found = empirical_margin_lipschitz(model.double(), (3, 8, 8), 0, 1)
    assert result.margin[0, 1] >= found


def test_estimate_never_exceeds_bound():
    model = ResidualNet("relu").eval()
    result = cfx.bound(model, (3, 8, 8), materialize_limit=0)
    assert (result.estimate <= result.margin * (1 + 1e-5) + 1e-6).all()
    assert result.tightness >= 1 - 1e-5


class Cosine(nn.Module):
    def forward(self, x):
        return torch.cos(x).flatten(1)


class HardshrinkNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.shrink = nn.Hardshrink()  # discontinuous at +-lambda

    def forward(self, x):
        return self.shrink(x).flatten(1)


@pytest.mark.parametrize("model,fragment", [(Cosine(), "cos"), (HardshrinkNet(), "Hardshrink")])
def test_unknown_ops_raise_instead_of_counting_as_one(model, fragment):
    with pytest.raises(UnsupportedNodeError) as info:
        cfx.bound(model, (4, 2, 2))
    assert fragment in str(info.value) and "node '" in str(info.value)


class Gate(nn.Module):
    """A squeeze-excitation style gate: a product of two activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return (x * torch.sigmoid(self.conv(x.mean((2, 3), keepdim=True)))).flatten(1)


class TrainBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(x).flatten(1)


class LN(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(x.flatten(2).transpose(1, 2)).flatten(1)


@pytest.mark.parametrize("model,node", [(Gate(), "mul"), (TrainBN().train(), "bn"), (LN(), "norm")])
def test_non_lipschitz_nodes_name_node_and_fix(model, node):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotLipschitzError) as info:
        cfx.bound(model, (4, 3, 3))
    for key, value in model.state_dict().items():  # bounding never changes the model
        assert torch.equal(value, state[key]), key
    message = str(info.value)
    assert f"node '{node}" in message and "Fix:" in message
    assert "While executing" not in message


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnets_bound_soundly(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    result = cfx.bound(model, (3, 32, 32), estimate_steps=5)  # 224x224: test_timm_resnets_at_224 (slow)
    assert result.sound and result.margin.shape == (10, 10)
    assert torch.isfinite(result.margin).all() and (result.margin[~torch.eye(10, dtype=bool)] > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnets_at_224(name):
    timm = pytest.importorskip("timm")
    result = cfx.bound(timm.create_model(name, pretrained=False).eval(), (3, 224, 224), estimate_steps=0)
    assert result.sound and result.margin.shape == (1000, 1000)


def test_vit_raises_clear_error():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    with pytest.raises(NotLipschitzError) as info:
        cfx.bound(model, (3, 224, 224))
    message = str(info.value)
    assert "blocks.0.norm1" in message and "remove_normalization" in message


@pytest.mark.parametrize("form", ["max", "clamp", "clamp_min", "maximum_method"])
def test_a_constant_that_broadcasts_the_input_counts_the_copies(form):
    """max(x, c) / clamp(x, c) with a constant c of a larger shape copies each element of x: the
    bound must include sqrt(copies) (it did not, and came out sqrt(5) too small here)."""
    ops = {"max": lambda x, c: torch.max(x, c), "clamp": lambda x, c: torch.clamp(x, min=c),
           "clamp_min": lambda x, c: x.clamp_min(c), "maximum_method": lambda x, c: x.max(c)}

    class Copies(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.full((5,), -100.0))
            self.fc = nn.Linear(5, 2, bias=False)
            with torch.no_grad():
                self.fc.weight.copy_(torch.tensor([[1.0] * 5, [-1.0] * 5]))

        def forward(self, x):  # (N, 1) -> (N, 5): f0 - f1 = 10 x
            return self.fc(ops[form](x, self.c))

    margin = cfx.bound(Copies().eval(), (1,), estimate_steps=0).margin
    assert 10.0 <= margin[0, 1].item() <= 10.0 * (1 + 1e-5)


MAXMIN_FORMS = {
    "max_min": lambda x: torch.cat([torch.max(x[:, :4], x[:, 4:]), torch.min(x[:, :4], x[:, 4:])], 1),
    "maximum_swapped": lambda x: torch.cat([torch.maximum(x[:, :4], x[:, 4:]), torch.minimum(x[:, 4:], x[:, :4])], 1),
    "method": lambda x: torch.cat([x[:, :4].max(x[:, 4:]), x[:, :4].min(x[:, 4:])], 1),
}


class _TwoConvs(nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 3)
        self.act = act

    def forward(self, x):
        return self.fc(self.act(self.c2(self.act(self.c1(x)))).flatten(1))


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("form", list(MAXMIN_FORMS))
def test_minmax_written_with_max_and_min_is_bounded_as_minmax(form):
    """orthogonium-style MaxMin (max and min of two halves, the halves sliced again for each):
    the pair is one sort, so the bound equals MinMax's; a lone max pays for both halves."""
    reference = cfx.bound(_TwoConvs(MinMax(dim=1)).eval(), (1, 4, 4), estimate_steps=0).max_margin
    written = cfx.bound(_TwoConvs(_Fn(MAXMIN_FORMS[form])).eval(), (1, 4, 4), estimate_steps=0).max_margin
    assert written == pytest.approx(reference, rel=1e-12)
    lone = _Fn(lambda x: torch.cat([torch.max(x[:, :4], x[:, 4:])] * 2, 1))
    assert cfx.bound(_TwoConvs(lone).eval(), (1, 4, 4), estimate_steps=0).max_margin > reference * 1.01
