"""Exact folding: a folded operator computes exactly what the unfolded sequence computes."""

import torch

from certify_fx.bounds.operators import (Concat, Conv2d, Dense, Identity, Permute, Reshape, Scale, Select, Sum, add,
                                         compose, materialize, materialized_bound)


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


def _padded_conv(seed: int, channels: int = 4, size: int = 6) -> Conv2d:
    g = torch.Generator().manual_seed(seed)
    return Conv2d((channels, size, size), torch.randn(channels, channels, 3, 3, generator=g) * 0.3, (1, 1), (1, 1, 1, 1))


def test_a_residual_branch_on_a_shared_value_folds_into_one_kernel():
    """P + R P = (I + R) P: bounded as one kernel (||I + R|| ||P||), not 1 + ||R|| (triangle)."""
    p, r = _padded_conv(0), _padded_conv(1)
    summed = add(p, compose(r, p))
    assert isinstance(summed, Conv2d) or not isinstance(summed, Sum)
    assert torch.allclose(materialize(summed), materialize(Sum([p, compose(r, p)])), atol=1e-9)
    bound, fold = summed.upper_bound().value, add(Identity(p.out_shape), r)  # I + R as one kernel
    assert bound >= materialized_bound(summed).value * (1 - 1e-9)
    assert bound <= fold.upper_bound().value * p.upper_bound().value * (1 + 1e-9)
    assert bound < (1 + r.upper_bound().value) * p.upper_bound().value  # the triangle inequality's bound


def test_the_halves_of_one_map_stacked_again_are_bounded_by_that_map():
    """cat of selections of P's output (MinMax's halves): sqrt(most copies) ||P||, exactly ||P|| for
    disjoint halves, where the generic stack bound is sqrt(2) ||P||."""
    p = _padded_conv(2)
    halves = [compose(Select(p.out_shape, (2, 6, 6), (slice(a, a + 2),)), p) for a in (0, 2)]
    stacked = Concat(p.in_shape, (4, 6, 6), halves, [2, 2], 0)
    assert abs(stacked.upper_bound().value - p.upper_bound().value) <= 1e-9 * p.upper_bound().value
    assert stacked.upper_bound().value >= materialized_bound(stacked).value * (1 - 1e-9)
    copied = Concat(p.in_shape, (4, 6, 6), [halves[0], halves[0]], [2, 2], 0)  # one half twice: sqrt(2)
    assert abs(copied.upper_bound().value - 2 ** 0.5 * p.upper_bound().value) <= 1e-6
    assert copied.upper_bound().value >= materialized_bound(copied).value * (1 - 1e-9)
    reshaped = Concat(p.in_shape, (1, 4, 6, 6), [compose(Reshape((2, 6, 6), (1, 2, 6, 6)), h) for h in halves], [2, 2],
                      1)
    assert reshaped.upper_bound().value >= materialized_bound(reshaped).value * (1 - 1e-9)


def test_a_conv_without_padding_after_any_conv_folds_into_one_exact_conv():
    generator = torch.Generator().manual_seed(0)
    folded = 0
    for _ in range(60):
        c1, c2, c3, k1, k2 = (int(v) for v in torch.randint(1, 5, (5,), generator=generator))
        s1, s2 = (int(v) for v in torch.randint(1, 3, (2,), generator=generator))
        pads = tuple(int(v) for v in torch.randint(0, 3, (4,), generator=generator))
        n = k1 + k2 + int(torch.randint(0, 6, (1,), generator=generator))
        inner = Conv2d((c1, n, n + 1), torch.randn(c2, c1, k1, k1, generator=generator), (s1, s1), pads)
        if min(inner.out_shape[1:]) < k2:
            continue
        outer = Conv2d(inner.out_shape, torch.randn(c3, c2, k2, k2, generator=generator), (s2, s2))
        op = compose(outer, inner)
        assert isinstance(op, Conv2d)
        x = torch.randn(3, c1, n, n + 1, generator=generator)
        torch.testing.assert_close(op.apply(x), outer.apply(inner.apply(x)), rtol=1e-4, atol=1e-4)
        folded += 1
    assert folded > 30


def test_trimming_dead_kernel_taps_keeps_the_map():
    generator = torch.Generator().manual_seed(1)
    trimmed = 0
    for _ in range(80):
        c, k, s = (int(v) for v in torch.randint(1, 4, (3,), generator=generator))
        k = 2 * k + 1
        n = int(torch.randint(1, 5, (1,), generator=generator))
        pads = tuple(int(v) for v in torch.randint(0, k, (4,), generator=generator))
        op = Conv2d((c, n, n + 1), torch.randn(2, c, k, k, generator=generator), (s, s), pads)
        if min(op.out_shape[1:]) < 1:
            continue
        small = op.trimmed()
        x = torch.randn(3, c, n, n + 1, generator=generator)
        torch.testing.assert_close(small.apply(x), op.apply(x))
        trimmed += small.weight.numel() < op.weight.numel()
    assert trimmed > 20


def test_the_identity_plus_a_token_map_is_one_dense_map_over_tokens():
    """``I + Q^T X Q = Q^T (I + X) Q``: bounded as ``||I + T||``, not ``1 + ||T||``."""
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):
        tokens, dim = (int(v) for v in torch.randint(2, 7, (2,), generator=generator))
        weight = torch.randn(tokens, tokens, generator=generator)
        to_last = Permute((tokens, dim), (1, 0))
        mixing = compose(Permute((dim, tokens), (1, 0)), compose(Dense((dim, tokens), weight), to_last))
        op = add(Identity((tokens, dim)), mixing)
        x = torch.randn(3, tokens, dim, generator=generator)
        torch.testing.assert_close(op.apply(x), x + mixing.apply(x))
        exact = torch.linalg.matrix_norm(torch.eye(tokens) + weight, 2).item()
        assert exact <= op.upper_bound().value <= exact * (1 + 1e-5)
