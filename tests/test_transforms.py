"""Graph transforms: exact passes preserve the function; convert() yields sound, trainable models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certify_fx as cfx
from certify_fx.errors import CertifyFxError, TraceError, UnsupportedNodeError
from certify_fx.nn import LinearBottleneck, LiResNetBlock, TokenMixing
from certify_fx.bounds.capture import trace
from certify_fx.transforms import (fold_batchnorm, fold_linear_chains, fold_linear_residuals, rewrite_log,
                                   split_norm_act)

timm = pytest.importorskip("timm")


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


class Parallel(nn.Module):
    """x + conv(x), a strided 1x1 + 3x3 pair, scalar scalings, and a linear chain."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.down3 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.down1 = nn.Conv2d(4, 8, 1, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(x + 0.5 * self.a(x))
        x = F.relu(self.bn(self.down3(x) + self.down1(x)))
        return self.fc2(self.fc1(x.flatten(1)))


@pytest.mark.parametrize("name,factory", [
    ("parallel", lambda: Parallel()),
    ("resnet18", lambda: timm.create_model("resnet18", num_classes=10)),
    ("resnetv2_50", lambda: timm.create_model("resnetv2_50", num_classes=10)),
])
def test_exact_passes_preserve_outputs(name, factory):
    model = _randomize_bn(factory())
    shape = (4, 8, 8) if name == "parallel" else (3, 64, 64)
    x = torch.rand(3, *shape)
    reference = model(x)
    gm = trace(model)
    for pass_fn in (split_norm_act, fold_batchnorm, fold_linear_residuals, fold_linear_chains):
        gm = pass_fn(gm, shape)
        torch.testing.assert_close(gm(x), reference, atol=1e-5, rtol=1e-4)
    log = rewrite_log(gm)
    assert log and not any(r.changes_function for r in log)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    if name == "parallel":
        passes = {r.pass_name for r in log}
        assert {"fold_batchnorm", "fold_linear_residuals", "fold_linear_chains"} <= passes


class UserNet(nn.Module):
    """Functional activations and a residual block nested inside another residual block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner1 = nn.Conv2d(8, 8, 3, padding=1)
        self.inner2 = nn.Conv2d(8, 8, 3, padding=1)
        self.outer = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def inner(self, x):
        return x + self.inner2(F.gelu(self.inner1(x)))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.outer(F.silu(self.inner(x)))
        x = self.bn(x).relu()
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("to", ["liresnet", "lipschitz"])
def test_user_model_converts_and_bounds(to):
    model = _randomize_bn(UserNet())
    converted = cfx.convert(model, to=to, input_shape=(3, 8, 8))
    assert isinstance(converted, torch.fx.GraphModule)
    result = cfx.bound(converted, (3, 8, 8))
    assert result.sound and torch.isfinite(result.margin).all()
    assert all(not isinstance(m, (nn.GELU, nn.SiLU, nn.ReLU, nn.BatchNorm2d)) for m in converted.modules())
    targets = {n.target for n in converted.graph.nodes if n.op in ("call_function", "call_method")}
    assert not targets & {torch.relu, F.relu, F.gelu, F.silu, "relu"}
    passes = {r.pass_name for r in converted.rewrite_log}
    assert "replace_activations" in passes
    if to == "liresnet":  # the nested residual became a linear one, composed or factored
        assert any(isinstance(m, (LiResNetBlock, LinearBottleneck)) for m in converted.modules())
    # the input model is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _residual_outputs(model: nn.Module, shape) -> list[tuple[int, ...]]:
    """(C, H, W) after every residual block: LiResNet blocks / transitions, or adds in the source."""
    from certify_fx.transforms.fold_linear_residuals import is_add
    from certify_fx.transforms.graph import annotate_shapes

    gm = model if isinstance(model, torch.fx.GraphModule) else trace(model)
    annotate_shapes(gm, shape)
    out = []
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        # converted blocks: linear residual blocks and transition convs the linearize pass named "*_block*"
        is_block = isinstance(module, (LiResNetBlock, LinearBottleneck, nn.Conv2d)) and "_block" in str(node.target)
        if is_add(node) or is_block:
            out.append(tuple(node.meta["shape"][1:]))
    return out


LIRESNET_BLOCKS = {"resnet18": 5, "resnet34": 13, "resnet50": 12, "resnet101": 29, "resnet26d": 4,
                   "wide_resnet50_2": 12, "resnetv2_50": 12}
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["resnet18"] + [pytest.param(n, marks=_SLOW) for n in (
    "resnet34", "resnet50", "resnet101", "resnet26d", "wide_resnet50_2", "resnetv2_50")])
def test_resnets_convert_to_liresnet_keep_stages_and_bound(name):
    shape = (3, 64, 64)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    converted = cfx.convert(model, to="liresnet", input_shape=shape)
    result = cfx.bound(converted, shape, estimate_steps=0)
    assert result.sound and torch.isfinite(result.margin).all()
    assert _residual_outputs(model, shape) == _residual_outputs(converted, shape)
    blocks = [m for m in converted.modules() if isinstance(m, LiResNetBlock) or
              isinstance(m, LinearBottleneck) and m.shortcut is None]  # identity-shortcut linear blocks
    assert len(blocks) == LIRESNET_BLOCKS[name]


def test_converted_liresnet_block_bound_is_exact_norm_of_folded_conv():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), _Block(16), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 16 * 16, 4)).eval()
    _randomize_bn(model)
    converted = cfx.convert(model, to="liresnet", input_shape=(3, 16, 16))
    (name, block), = [(n, m) for n, m in converted.named_modules() if isinstance(m, LiResNetBlock)]
    result = cfx.bound(converted, (3, 16, 16))
    row = next(r for r in result.nodes if r.kind == "linear" and "conv3x3 16->16" in r.op)
    from certify_fx.bounds import PowerIteration

    folded = nn.Conv2d(16, 16, 3, padding=1, bias=False).double()
    folded.weight.data = block.folded_weight().detach().double()
    exact = PowerIteration(folded, (16, 16, 16)).converge(tol=1e-13, max_steps=20000).item()
    assert exact * (1 - 1e-6) <= row.factor <= 1.01 * exact


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv3(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224"] + [pytest.param(n, marks=_SLOW) for n in (
    "deit_tiny_patch16_224", "vit_small_patch16_224")])
def test_vits_convert_to_lipschitz_vit(name):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    converted = cfx.convert(model, to="lipschitz-vit")
    result = cfx.bound(converted, (3, 224, 224), estimate_steps=0)
    assert result.sound and torch.isfinite(result.margin).all()
    passes = {r.pass_name for r in converted.rewrite_log}
    assert {"attention_to_spatial_mlp", "remove_normalization", "linearize_residual_branches"} <= passes
    targets = {n.target for n in converted.graph.nodes if n.op == "call_function"}
    assert not targets & {F.scaled_dot_product_attention, F.layer_norm, F.gelu}


def test_a_converted_vit_block_is_bounded_exactly():
    """Pure token mixing: a block is (I + T) over tokens then I + W over channels, bounded as the
    product of the two exact norms (the norm of their Kronecker product)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, depth=2,
                              num_classes=3).eval()
    shape = (1, 16, 16)
    converted = cfx.convert(model, to="lipschitz-vit", input_shape=shape, rescale=False)
    mixing = converted.get_submodule("cfx_blocks_1_attn_mix")
    dense = converted.get_submodule("cfx_add_4")  # the folded feed-forward residual: holds I + W
    eye = torch.eye(mixing.num_tokens, dtype=torch.float64)
    exact = (torch.linalg.matrix_norm(eye + mixing.weight.double(), 2) *
             torch.linalg.matrix_norm(dense.weight.double(), 2)).item()
    result = cfx.bound(converted, shape, estimate_steps=0)
    (row,) = [r for r in result.nodes if r.node == "cfx_add_4"]  # the second block (the first holds the embedding)
    assert exact <= row.factor <= exact * (1 + 1e-5)
    projected = cfx.convert(model, to="lipschitz-vit", input_shape=shape, rescale=False, spatial_mlp="projected")
    assert any(isinstance(m, TokenMixing) for m in projected.modules())
    assert cfx.bound(projected, shape, estimate_steps=0).sound


def test_converted_model_trains():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    converted = cfx.convert(model, to="liresnet", input_shape=(3, 32, 32)).train()
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    loss = F.cross_entropy(converted(torch.rand(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
    loss.backward()
    optimizer.step()
    changed = [k for k, v in converted.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    result = cfx.bound(converted.eval(), (3, 32, 32), estimate_steps=0)
    assert result.sound and torch.isfinite(result.margin).all()


def test_save_and_load_without_running_code(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    converted = cfx.convert(model, to="liresnet", input_shape=(3, 32, 32))
    with torch.no_grad():
        next(converted.parameters()).add_(1.0)  # weights differ from a fresh conversion
    path = tmp_path / "r18.pt"
    cfx.save_converted(converted, path, {"kind": "timm", "name": "resnet18", "kwargs": {"num_classes": 10}})
    payload = torch.load(path, weights_only=True)  # plain tensors and data only
    assert payload["format"] == "certify-fx/converted"
    loaded = cfx.load_converted(path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), converted(x))
    # a spec naming Python code is not imported unless trusted
    payload["source"] = {"kind": "module", "spec": "os:getcwd", "kwargs": {}}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CertifyFxError, match="trust_source"):
        cfx.load_converted(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CertifyFxError, match="not a readable"):
        cfx.load_converted(tmp_path / "junk.pt")


class Gated(nn.Module):
    """An elementwise self-gate (SiLU written out): no pass makes it Lipschitz. (Per-channel SE
    gates do convert: tests/test_pipeline.py.)"""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((y * torch.sigmoid(y + 1)).mean((2, 3)))


class DataDependent(nn.Module):
    def forward(self, x):
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


def test_unsupported_models_fail_naming_node_and_op():
    with pytest.raises(UnsupportedNodeError) as info:
        cfx.convert(Gated(), to="liresnet", input_shape=(4, 4, 4))
    message = str(info.value)
    assert "node 'mul'" in message and "product" in message and "Traceback" not in message
    assert "convert(" not in message  # advice after converting never loops back to converting
    with pytest.raises(TraceError, match="could not trace"):
        cfx.convert(DataDependent(), to="lipschitz", input_shape=(4, 4, 4))
    with pytest.raises(ValueError, match="unknown conversion target"):
        cfx.convert(Gated(), to="nope", input_shape=(4, 4, 4))


def test_a_registered_activation_is_a_leaf_and_replaced_by_convert():
    """A rule registered with kind="activation" is all it takes: the tracer keeps the module as a
    leaf (its forward, which branches on the input's shape, is never traced) and convert replaces
    it by MinMax."""
    from certify_fx.bounds import registry
    from certify_fx.nn import MinMax

    class SmoothAbs(nn.Module):  # sqrt(x^2 + 1) - 1: its derivative x / sqrt(x^2 + 1) lies in (-1, 1)
        def forward(self, x):
            if x.dim() != 4:  # Python on the input's shape: symbolic tracing cannot go through it
                raise ValueError("4-d inputs only")
            return (x * x + 1).sqrt() - 1

    @cfx.register_module_rule(SmoothAbs, kind="activation")
    def smooth_abs(ev, module, input):
        return ev.nonlinear(input, 1.0)

    try:
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), SmoothAbs(), nn.Flatten(), nn.Linear(64, 3)).eval()
        leaves = [n for n in trace(model).graph.nodes if n.op == "call_module"]
        assert [type(model.get_submodule(n.target)) for n in leaves].count(SmoothAbs) == 1
        assert cfx.bound(model, (1, 4, 4), estimate_steps=0).sound
        converted = cfx.convert(model, "liresnet", input_shape=(1, 4, 4))
        kinds = [type(m) for m in converted.modules()]
        assert SmoothAbs not in kinds and MinMax in kinds
    finally:
        registry.MODULE_RULES.pop(SmoothAbs, None)


def test_a_channels_first_layer_norm_becomes_an_affine_over_channels():
    """timm's LayerNorm2d (ConvNeXt) normalises dim 1 of (N, C, H, W); its Affine scales channels.
    A LayerNorm subclass with a forward of its own is traced into: its layer_norm, between its
    own transposes, becomes an Affine over the last dim."""
    from timm.layers import LayerNorm2d

    from certify_fx.transforms import remove_normalization

    class Custom(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.transpose(1, 3)).transpose(1, 3)

    norm = LayerNorm2d(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, Custom(8)).eval()
    gm = remove_normalization(trace(model), (3, 5, 6))
    affines = [m for m in gm.modules() if isinstance(m, cfx.nn.Affine)]
    assert [a.dim for a in affines] == [1, -1]
    torch.testing.assert_close(affines[0].weight, norm.weight)
    x = torch.randn(2, 3, 5, 6)
    expected = model[0](x) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    expected = (expected.transpose(1, 3) * model[2].weight + model[2].bias).transpose(1, 3)
    torch.testing.assert_close(gm(x), expected)
