"""Exactness: on networks with no nonlinearity, K[i, j] is never below the exact margin norm."""

import pytest
import torch
from torch import nn

import certify_fx as cfx
from certify_fx.nn import Affine, LiResNetBlock, LLNLinear, MinMax
from conftest import exact_margin_norms, jacobian_rows


class Residual(nn.Module):
    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride, 1)
        self.short = nn.Conv2d(c, c, 1, stride) if stride > 1 else None

    def forward(self, x):
        return self.conv(x) + (self.short(x) if self.short is not None else x)


def _linear_nets():
    yield "conv-stack", nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, stride=2, padding=1),
                                      nn.Flatten(), nn.Linear(4 * 4 * 4, 5)), (3, 8, 8)
    yield "strided-padded", nn.Sequential(nn.Conv2d(2, 4, 5, stride=2, padding=2), nn.AvgPool2d(2),
                                          nn.Flatten(), nn.Linear(4 * 2 * 2, 6)), (2, 9, 9)
    yield "dilated-grouped", nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
                                           nn.Conv2d(4, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                           nn.Linear(8, 4)), (4, 6, 6)
    yield "liresnet-blocks", nn.Sequential(LiResNetBlock(4, 2), LiResNetBlock(4, 2), nn.Flatten(),
                                           LLNLinear(4 * 5 * 5, 3)), (4, 5, 5)
    yield "residual-strided", nn.Sequential(Residual(3), Residual(3, stride=2), nn.BatchNorm2d(3).eval(),
                                            Affine(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)), (3, 7, 7)
    yield "linear-chain", nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.Linear(20, 7), nn.Linear(7, 5)), (3, 2, 2)


@pytest.mark.parametrize("name,model,shape", list(_linear_nets()), ids=[n for n, *_ in _linear_nets()])
@pytest.mark.parametrize("limit", [1024, 0], ids=["materialised", "symbolic"])
def test_margin_never_below_exact(name, model, shape, limit):
    model = model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-2, 2)
    result = cfx.bound(model, shape, materialize_limit=limit)
    exact = exact_margin_norms(jacobian_rows(model, shape)).float()
    assert result.sound
    assert (result.margin >= exact * (1 - 1e-6) - 1e-7).all(), (result.margin - exact).min()
    assert torch.equal(result.margin.diagonal(), torch.zeros(result.num_classes))


@pytest.mark.parametrize("size,channels", [(8, 4), (8, 32), (16, 8), (24, 16)])
def test_single_folded_block_within_one_percent(size, channels):
    """A LiResNet block x + conv(x) is one conv; the compiler bounds it within 1% of its exact norm."""
    block = LiResNetBlock(channels, num_blocks=1).double().eval()
    shape = (channels, size, size)
    x = torch.randn(2, *shape, dtype=torch.float64)
    folded = nn.Conv2d(channels, channels, 3, padding=1, bias=False).double()
    folded.weight.data = block.folded_weight().detach()
    torch.testing.assert_close(folded(x) + block.folded_bias().view(1, -1, 1, 1), block(x))

    # K of the block as the compiler reports it (a MinMax consumes it), against the exact norm
    model = nn.Sequential(block, MinMax(), nn.Flatten(), nn.Linear(channels * size * size, 10)).double().eval()
    result = cfx.bound(model, shape)
    row = next(r for r in result.nodes if r.kind == "linear")
    exact = _exact_operator_norm(folded, shape)
    assert exact * (1 - 1e-9) <= row.factor <= 1.01 * exact

    # and the margins of block -> flatten -> dense, against the materialised Jacobian
    head = nn.Sequential(block, nn.Flatten(), nn.Linear(channels * size * size, 10)).double().eval()
    exact_margins = exact_margin_norms(jacobian_rows(head, shape))
    margins = cfx.bound(head, shape).margin.double()
    assert (margins >= exact_margins * (1 - 1e-6)).all()
    off = ~torch.eye(10, dtype=torch.bool)
    assert (margins[off] <= 1.01 * exact_margins[off]).all()


def _exact_operator_norm(conv: nn.Conv2d, shape) -> float:
    """||conv|| from its power iteration run to convergence, checked against a dense SVD when small."""
    from certify_fx.bounds import PowerIteration

    numel = shape[0] * shape[1] * shape[2]
    if numel <= 2048:
        jac = jacobian_rows(nn.Sequential(conv, nn.Flatten()), shape)
        return torch.linalg.matrix_norm(jac, 2).item()
    return PowerIteration(conv, shape).converge(tol=1e-12, max_steps=20000).item()


def test_sum_of_parallel_branches_is_folded():
    """A strided 1x1 shortcut plus a strided 3x3 conv is bounded as one conv, not as a sum."""

    model = nn.Sequential(Residual(4, stride=2), nn.Flatten()).eval()
    compiler = cfx.BoundCompiler(model, (4, 8, 8), materialize_limit=0)
    result = compiler.sound_bound()
    row = next(r for r in result.nodes if r.kind == "output")
    assert "+" not in row.op and row.op.count("conv") == 1
    branches = (cfx.bound(nn.Sequential(model[0].conv, nn.Flatten()), (4, 8, 8), materialize_limit=0).nodes[-1].factor
                + cfx.bound(nn.Sequential(model[0].short, nn.Flatten()), (4, 8, 8), materialize_limit=0).nodes[-1].factor)
    assert row.factor < branches


class _Tokens(nn.Module):
    """Token mixing and channel projections on (batch, tokens, channels)."""

    def __init__(self):
        super().__init__()
        from certify_fx.nn import TokenMixing

        self.pad = nn.ZeroPad2d((1, -1, 2, 0))  # pads and crops
        self.mix = TokenMixing(16)
        self.proj = nn.Linear(3, 3)
        self.head = nn.Linear(48, 4)
        nn.init.normal_(self.mix.weight)

    def forward(self, x):
        x = self.pad(x).flatten(2).transpose(1, 2)  # (B, 16 tokens, 3 channels)
        return self.head(self.proj(self.mix(x)).flatten(1))


@pytest.mark.parametrize("limit", [2048, 0], ids=["materialised", "symbolic"])
def test_new_ops_token_mixing_and_padding_never_below_exact(limit):
    model = _Tokens().eval()
    shape = (3, 2, 4)
    result = cfx.bound(model, shape, materialize_limit=limit)
    exact = exact_margin_norms(jacobian_rows(model, shape)).float()
    assert result.sound and (result.margin >= exact * (1 - 1e-6) - 1e-7).all()


@pytest.mark.parametrize("kind", ["residual", "downsampling"])
def test_a_factored_bottleneck_is_bounded_through_its_channels_within_one_percent(kind):
    """A converted bottleneck (LinearBottleneck 1x1 -> 3x3 -> 1x1, padding on the first conv) is
    bounded on its narrow channels; the compiler's constant is never below the block's exact norm
    and within 1% of it, with the materialisation off so the structured path is the one taken."""
    from certify_fx.nn import LinearBottleneck

    c, r, size = 16, 4, 10
    stride, out = (1, c) if kind == "residual" else (2, 2 * c)
    convs = [nn.Conv2d(c, r, 1, padding=1, bias=False), nn.Conv2d(r, r, 3, stride, bias=False),
             nn.Conv2d(r, out, 1, bias=False)]
    shortcut = None if kind == "residual" else nn.Conv2d(c, out, 1, stride, bias=False)
    block = LinearBottleneck(convs, shortcut).double().eval()
    shape = (c, size, size)
    out_size = block(torch.zeros(1, *shape, dtype=torch.float64)).shape[-1]
    model = nn.Sequential(block, MinMax(), nn.Flatten(), nn.Linear(out * out_size**2, 10)).double().eval()
    result = cfx.bound(model, shape, materialize_limit=0)
    row = next(r for r in result.nodes if r.kind == "linear")
    assert "channel-reduced" in row.method
    jac = jacobian_rows(nn.Sequential(block, nn.Flatten()), shape)
    exact = torch.linalg.matrix_norm(jac, 2).item()
    assert exact * (1 - 1e-9) <= row.factor <= 1.01 * exact
