"""Lipschitz layers."""

import pytest
import torch
from torch import nn

from certify_fx.nn import Affine, GroupSort, LiResNetBlock, LLNLinear, MinMax, Normalize


def test_minmax_sorts_channel_pairs_and_is_an_isometry_per_input():
    x = torch.tensor([[[[3.0]], [[1.0]], [[-2.0]], [[5.0]]]])
    assert MinMax()(x).flatten().tolist() == [1.0, 3.0, -2.0, 5.0]
    a, b = torch.randn(5, 6, 4, 4), torch.randn(5, 6, 4, 4)
    act = MinMax()
    assert ((act(a) - act(b)).flatten(1).norm(dim=1) <= (a - b).flatten(1).norm(dim=1) + 1e-6).all()
    assert torch.allclose(act(a).flatten(1).norm(dim=1), a.flatten(1).norm(dim=1))


def test_minmax_odd_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by 2"):
        MinMax()(torch.randn(2, 3, 4, 4))


def test_groupsort_matches_minmax_for_pairs_and_sorts_tokens():
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(GroupSort(2)(x), MinMax()(x))
    tokens = torch.randn(2, 7, 8)
    out = GroupSort(4, dim=-1)(tokens)
    assert (out.unflatten(-1, (2, 4)).diff(dim=-1) >= 0).all()


def test_affine_and_normalize():
    affine = Affine(3)
    affine.weight.data = torch.tensor([1.0, -2.0, 0.5])
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(affine(x), x * affine.weight.view(1, 3, 1, 1))
    norm = Normalize([0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    torch.testing.assert_close(norm(x), (x - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1))
    with pytest.raises(ValueError):
        Normalize([0.0], [0.0])


def test_liresnet_block_is_its_folded_conv():
    block = LiResNetBlock(6, num_blocks=9)
    x = torch.randn(2, 6, 7, 7)
    folded = nn.functional.conv2d(x, block.folded_weight(), block.folded_bias(), padding=1)
    torch.testing.assert_close(block(x), folded)
    assert block.scale == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        LiResNetBlock(4, kernel_size=2)


def test_lln_rows_have_unit_norm():
    head = LLNLinear(5, 3)
    head.weight.data *= 10
    assert torch.allclose(head.normalized_weight().norm(dim=1), torch.ones(3))
    x = torch.randn(4, 5)
    torch.testing.assert_close(head(x), x @ head.normalized_weight().T + head.bias)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_cholesky_orthogonal_singular_values_follow_the_ridge_formula(shape):
    from certify_fx.nn import cholesky_orthogonal
    torch.manual_seed(0)
    v = torch.randn(*shape, dtype=torch.float64)
    q = cholesky_orthogonal(v, ridge=1e-3)
    s = torch.linalg.svdvals(v)
    r = 1e-3 * (v @ v.T if shape[0] <= shape[1] else v.T @ v).diagonal().mean()
    assert torch.allclose(torch.linalg.svdvals(q), s / (s**2 + r).sqrt(), atol=1e-12)
    assert torch.linalg.matrix_norm(q, 2) < 1


def test_cholesky_layers_train_and_keep_their_rule():
    from certify_fx.nn import CholeskyConv2d, CholeskyLinear
    torch.manual_seed(0)
    conv, dense = CholeskyConv2d(3, 4, patch_size=2), CholeskyLinear(16, 16, identity_init=True, init_scale=0.1)
    x = torch.randn(5, 3, 4, 4)
    y = dense(conv(x).flatten(1))
    y.square().sum().backward()
    assert conv.weight.grad.abs().sum() > 0 and dense.weight.grad.abs().sum() > 0
    # a patch conv with orthonormal rows preserves the norm of what its rows span; never increases any norm
    assert (conv(x).flatten(1).norm(dim=1) <= x.flatten(1).norm(dim=1) * (1 + 1e-6)).all()
    assert torch.dist(dense.orthogonal_weight(), torch.eye(16)) < 0.5  # starts near the identity
    with pytest.raises(ValueError, match="square"):
        CholeskyLinear(4, 5, identity_init=True)
