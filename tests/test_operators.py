"""Exact folding: a folded operator computes exactly what the unfolded sequence computes."""

import torch

from certify_fx.bounds.operators import Conv2d, Dense, Identity, Scale, Sum, add, compose, materialize


def _check_same(folded, reference, in_shape):
    x = torch.randn(3, *in_shape, dtype=torch.float64)
    torch.testing.assert_close(folded.apply(x), reference(x))
    y = torch.randn_like(folded.apply(x))
    torch.testing.assert_close((folded.apply(x) * y).sum(), (x * folded.adjoint(y)).sum())


def _conv(c_in, c_out, k, shape, s=1, p=None, g=1):
    p = k // 2 if p is None else p
    return Conv2d(shape, torch.randn(c_out, c_in // g, k, k, dtype=torch.float64), (s, s), (p, p, p, p), (1, 1), g)


def test_identity_plus_conv_folds_to_one_conv():
    shape = (4, 6, 6)
    conv = _conv(4, 4, 3, shape)
    folded = add(Identity(shape), conv)
    assert isinstance(folded, Conv2d)
    _check_same(folded, lambda x: x + conv.apply(x), shape)


def test_parallel_strided_branches_fold():
    shape = (4, 9, 9)
    a, b = _conv(4, 6, 3, shape, s=2), _conv(4, 6, 1, shape, s=2, p=0)
    folded = add(a, b)
    assert isinstance(folded, Conv2d) and folded.stride == (2, 2)
    _check_same(folded, lambda x: a.apply(x) + b.apply(x), shape)


def test_scale_and_pointwise_convs_fold_into_conv():
    shape = (4, 5, 5)
    scale_in = Scale(shape, torch.rand(4, 1, 1, dtype=torch.float64) + 0.5)
    conv = _conv(4, 6, 3, shape, g=2)
    scale_out = Scale(conv.out_shape, torch.rand(6, 1, 1, dtype=torch.float64))
    pointwise = _conv(6, 3, 1, conv.out_shape, s=2, p=0)
    chain = compose(pointwise, compose(scale_out, compose(conv, scale_in)))
    assert isinstance(chain, Conv2d)
    _check_same(chain, lambda x: pointwise.apply(scale_out.apply(conv.apply(scale_in.apply(x)))), shape)


def test_bottleneck_1x1_3x3_1x1_folds_to_one_3x3():
    shape = (8, 6, 6)
    c1, c2 = _conv(8, 4, 1, shape, p=0), _conv(4, 4, 3, (4, 6, 6))
    c3 = _conv(4, 8, 1, (4, 6, 6), p=0)
    chain = compose(c3, compose(c2, c1))
    assert isinstance(chain, Conv2d) and chain.weight.shape == (8, 8, 3, 3)
    _check_same(chain, lambda x: c3.apply(c2.apply(c1.apply(x))), shape)


def test_dense_chain_and_sum_fold():
    a, b = Dense((5,), torch.randn(7, 5, dtype=torch.float64)), Dense((7,), torch.randn(3, 7, dtype=torch.float64))
    chain = compose(b, a)
    assert isinstance(chain, Dense)
    _check_same(chain, lambda x: b.apply(a.apply(x)), (5,))
    square = Dense((5,), torch.randn(5, 5, dtype=torch.float64))
    total = add(square, Identity((5,)))
    assert isinstance(total, Dense)
    _check_same(total, lambda x: square.apply(x) + x, (5,))


def test_unfoldable_sum_is_bounded_by_triangle_inequality():
    shape = (2, 6, 6)
    a = compose(_conv(2, 2, 3, shape), _conv(2, 2, 3, shape))  # conv o conv: not exactly one conv
    total = add(a, Identity(shape))
    assert isinstance(total, Sum)
    exact = torch.linalg.matrix_norm(materialize(total), 2).item()
    assert total.upper_bound().value >= exact
