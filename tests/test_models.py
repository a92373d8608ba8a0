"""Model families: registered with timm, normalisation inside, bounds sound and tight where linear."""

import pytest
import timm
import torch
from torch import nn

import certify_fx as cfx
import certify_fx.models  # noqa: F401
from certify_fx.models import ConvNet, LiResNet, LipschitzViT
from certify_fx.nn import MinMax, ResNetBlock
from conftest import empirical_margin_lipschitz, exact_margin_norms, jacobian_rows

FAMILIES = ["liresnet_l6w128", "liresnet_l12w256", "liresnet_l12w512", "liresnet_l12w588", "chord_liresnet_l6w32", "gloro_convnet_l6w64",
            "gloro_resnet_l6w64", "convnet_4c3f", "convnet_6c2f", "convnet_8c2f", "lipschitz_vit_tiny_patch4"]


@pytest.mark.parametrize("name", FAMILIES)
def test_registered_with_timm(name):
    assert timm.is_model(name)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("liresnet_l4w32", dict(img_size=28, in_chans=1), (1, 28, 28)),
    ("chord_liresnet_l6w32", dict(img_size=28, in_chans=1, neck_dim=128), (1, 28, 28)),
    ("gloro_resnet_l6w32", dict(img_size=32), (3, 32, 32)),
    ("gloro_convnet_l6w32", dict(img_size=64), (3, 64, 64)),
    ("convnet_6c2f", dict(img_size=28, in_chans=1), (1, 28, 28)),
    ("convnet_4c3f", dict(), (3, 32, 32)),
    ("convnet_8c2f", dict(img_size=64, num_classes=200), (3, 64, 64)),
    ("lipschitz_vit_micro_patch4", dict(), (3, 32, 32)),
])
def test_forward_shapes_and_sound_bounds(name, kwargs, shape):
    num_classes = kwargs.pop("num_classes", 10)
    model = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
    assert model(torch.rand(2, *shape)).shape == (2, num_classes)
    assert model.pretrained_cfg["input_size"] == shape
    b = cfx.bound(model, shape, estimate_steps=0)
    assert b.sound and torch.isfinite(b.margin).all() and b.margin.shape == (num_classes, num_classes)


def test_normalisation_lives_inside_the_model():
    model = LiResNet(num_classes=3, depth=2, width=8, img_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    x = torch.rand(1, 3, 32, 32)
    manual = model.head(model.neck(model.blocks(model.stem((x - 0.5) / 0.25))))
    assert torch.allclose(model(x), manual, atol=1e-6)


def test_resnet_block_starts_as_the_identity_and_is_bounded_soundly():
    block = ResNetBlock(4)
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.beta.uniform_(0.5, 1.5)
    model = nn.Sequential(block, MinMax(), nn.Flatten(), nn.Linear(4 * 36, 3)).double().eval()
    b = cfx.bound(model, (4, 6, 6), estimate_steps=0)
    for i, j in [(0, 1), (1, 2)]:
        assert empirical_margin_lipschitz(model, (4, 6, 6), i, j, restarts=2, steps=30) <= b.margin[i, j] * (1 + 1e-5)


def test_block_kinds():
    for block, kind in [("liresnet", "LiResNetBlock"), ("conv", "Conv2d"), ("resnet", "ResNetBlock")]:
        model = LiResNet(num_classes=2, depth=2, width=8, block=block)
        assert type(model.blocks[0][0]).__name__ == kind
    with pytest.raises(ValueError, match="unknown block 'dense'"):
        LiResNet(block="dense")
    with pytest.raises(ValueError, match="unknown neck 'wide'"):
        LiResNet(neck="wide")
    with pytest.raises(ValueError, match="must not widen"):
        LiResNet(depth=1, width=4, img_size=8, stem=(3, 1, 1), neck="chord", neck_dim=17)


def test_chord_liresnet_has_the_recipe_paper_layout_and_proven_unit_dense_layers():
    model = timm.create_model("chord_liresnet_l6w32", num_classes=10, in_chans=1, img_size=28, neck_dim=128).eval()
    assert len(model.dense) == 8 and all(isinstance(layer[1], MinMax) for layer in model.dense)
    nodes = cfx.bound(model, (1, 28, 28), estimate_steps=0).nodes
    rows = [r for r in nodes if r.node.startswith(("neck", "dense")) and r.kind == "linear"]
    assert len(rows) == 9  # the neck's patch conv and dense map fold into one operator
    for r in rows:
        assert r.sound and 0.99 < r.factor <= 1 + 1e-5, r  # proven from the computed weights, not assumed


def _linearised(model):
    """The model with every MinMax replaced by the identity: a linear net whose Jacobian is exact."""
    for name, child in model.named_children():
        if isinstance(child, MinMax):
            setattr(model, name, nn.Identity())
        else:
            _linearised(child)
    return model


@pytest.mark.parametrize("build,shape", [
    (lambda: LipschitzViT(num_classes=4, in_chans=1, img_size=8, patch_size=4, embed_dim=6, depth=2), (1, 8, 8)),
    (lambda: ConvNet([(4, 3, 1, 1), (4, 4, 2, 1)], [6], num_classes=3, in_chans=1, img_size=8), (1, 8, 8)),
    (lambda: LiResNet(num_classes=3, depth=2, width=4, in_chans=1, img_size=8, neck_dim=6, stem=(3, 1, 1)), (1, 8, 8)),
    (lambda: LiResNet(num_classes=3, depth=2, width=4, in_chans=1, img_size=8, neck_dim=6, stem=(3, 1, 1), neck="chord",
                      dense_depth=2), (1, 8, 8)),
])
def test_linearised_families_are_bounded_exactly(build, shape):
    """Without activations each family is linear: the compiled margin constants must equal the
    exact norms of the materialised Jacobian's row differences (sound, and tight because the
    residual blocks and LiFFNs are folded into single operators)."""
    model = _linearised(build()).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    exact = exact_margin_norms(jacobian_rows(model, shape))
    b = cfx.bound(model, shape, estimate_steps=0)
    off = ~torch.eye(len(exact), dtype=torch.bool)
    assert (b.margin.double()[off] >= exact[off] * (1 - 1e-5)).all()
    assert (b.margin.double()[off] <= exact[off] * 1.01).all()


def test_lipschitz_vit_minmax_model_is_sound():
    model = LipschitzViT(num_classes=3, in_chans=1, img_size=8, patch_size=4, embed_dim=4, depth=2).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    b = cfx.bound(model, (1, 8, 8), estimate_steps=0)
    found = empirical_margin_lipschitz(model, (1, 8, 8), 0, 2, restarts=2, steps=30)
    assert found <= b.margin[0, 2] * (1 + 1e-5)
