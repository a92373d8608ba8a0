"""Channel factors: a folded bottleneck is bounded through its narrow channels, to the same value.

Random blocks as the converted ResNets hold them (identity + 1x1 -> kxk -> 1x1, a downsampling
block with its projection shortcut, a bare factored conv), each bounded three ways: through its
factors, from its full kernel (:func:`reference_bounds`, the path before factors existed) and
exactly (the norm of the materialised operator).
"""

import random
from dataclasses import replace

import pytest
import torch

from certify_fx.bounds.norms import conv2d_norm_bound, reference_bounds
from certify_fx.bounds.operators import Conv2d, Identity, Scale, add, compose, materialized_bound


def _randn(r: random.Random, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(r.randrange(2**31)), dtype=torch.float64)


def _branch(r: random.Random, c: int, hidden: int, out: int, n: int, stride: int, padding_first: bool):
    k = r.choice([1, 3, 5]) if stride == 1 else 3
    p = k // 2
    first = Conv2d((c, n, n), _randn(r, hidden, c, 1, 1) / c**0.5, padding=(p, p, p, p) if padding_first else (0,) * 4)
    middle = Conv2d(first.out_shape, _randn(r, hidden, hidden, k, k) / (k * hidden**0.5), (stride, stride),
                    (0,) * 4 if padding_first else (p, p, p, p))
    last = Conv2d(middle.out_shape, _randn(r, out, hidden, 1, 1) / hidden**0.5)
    scale = Scale(last.out_shape, torch.tensor(r.choice([0.1, 0.5, 1.0, -0.7]), dtype=torch.float64))
    return compose(scale, compose(last, compose(middle, first)))


def _draw(r: random.Random):
    kind = r.choice(["residual", "downsampling", "bare"])
    c, n = r.choice([6, 8, 12, 16]), r.choice([4, 5, 7, 8])
    hidden = r.randint(1, max(1, c // 3))
    if kind == "residual":
        branch = _branch(r, c, hidden, c, n, 1, r.random() < 0.5)
        shortcut = Identity((c, n, n)) if r.random() < 0.7 else Scale((c, n, n), torch.tensor(r.uniform(0.5, 2)))
        return kind, add(shortcut, branch)
    if kind == "downsampling":
        out = 2 * c
        branch = _branch(r, c, hidden, out, n, 2, True)
        projection = Conv2d((c, n, n), _randn(r, out, c, 1, 1) / c**0.5, (2, 2))
        return kind, add(projection, branch)
    return kind, _branch(r, c, hidden, c, n, r.choice([1, 2]), r.random() < 0.5)


def _per_frequency_svd(op: Conv2d) -> float:
    """The reference of the FFT bound for a stride-1 conv: the largest singular value of the full
    kernel's DFT over the canvas the bound uses (input size plus the larger padding per axis)."""
    t, b, l, rr = op.padding
    canvas = (op.in_shape[1] + max(t, b), op.in_shape[2] + max(l, rr))
    spectrum = torch.fft.fft2(op.weight.to(torch.float64), s=canvas).permute(2, 3, 0, 1)
    return torch.linalg.svdvals(spectrum).max().item() * (1 + 1e-6)


def test_random_factored_blocks_are_bounded_as_their_kernels():
    r = random.Random(0)
    reduced = {}
    for _ in range(60):
        kind, op = _draw(r)
        assert isinstance(op, Conv2d) and op.channel_factors is not None, kind
        fast = op.upper_bound()
        with reference_bounds():
            reference = op.upper_bound()
        exact = materialized_bound(op).value / (1 + 1e-6)
        assert fast.sound and fast.value >= exact * (1 - 1e-12), kind  # never below the exact norm
        # the reduction is exact: equal up to the thresholds' slack (1e-7 on an eigenvalue)
        assert abs(fast.value - reference.value) <= 1e-7 * reference.value, kind
        if op.stride == (1, 1) and min(op.padding) >= 0:
            assert fast.value == pytest.approx(_per_frequency_svd(op), rel=1e-7), kind
        reduced[kind] = reduced.get(kind, 0) + ("channel-reduced" in fast.method)
    assert all(reduced.get(k, 0) >= 5 for k in ("residual", "downsampling", "bare")), reduced


@pytest.mark.parametrize("floor_factor", [0.5, 0.99, 1.5])
def test_a_floor_is_proven_or_exceeded_never_lowered(floor_factor):
    w = torch.randn(6, 6, 3, 3, dtype=torch.float64)
    plain = conv2d_norm_bound(w, (9, 9), padding=(1, 1, 1, 1)).value
    floor = plain * floor_factor
    bound = conv2d_norm_bound(w, (9, 9), padding=(1, 1, 1, 1), at_least=floor).value
    assert bound == pytest.approx(max(plain, floor * (1 + 1e-6)), rel=1e-7)


def test_factors_of_another_kernel_are_ignored():
    r = random.Random(1)
    branch = _branch(r, 8, 2, 8, 6, 1, True)
    block = add(Identity((8, 6, 6)), branch)
    assert block.channel_factors is not None
    changed = replace(block, weight=block.weight * 2)  # factors that now describe nothing
    assert changed.channel_factors is None
    with reference_bounds():
        expected = changed.upper_bound().value
    assert changed.upper_bound().value == pytest.approx(expected, rel=1e-12)
    assert "channel-reduced" not in changed.upper_bound().method


def test_factors_follow_trimming_and_casts():
    g = torch.Generator().manual_seed(2)
    first = Conv2d((8, 2, 3), torch.randn(2, 8, 1, 1, generator=g, dtype=torch.float64), padding=(2, 2, 2, 2))
    middle = Conv2d(first.out_shape, torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64))
    last = Conv2d(middle.out_shape, torch.randn(8, 2, 1, 1, generator=g, dtype=torch.float64))
    block = add(Identity((8, 2, 3)), compose(last, compose(middle, first)))
    small = block.trimmed()  # on a 2x3 map a 5x5 kernel reads the input through 3x4 of its taps
    assert small.weight.shape[-2:] != block.weight.shape[-2:]
    for op in (small, small.to(torch.float32)):
        assert op.channel_factors is not None
        with reference_bounds():
            expected = op.upper_bound().value
        assert op.upper_bound().value == pytest.approx(expected, rel=1e-6)
