"""Activation constants are upper bounds on sup |f'| (checked against scipy's maximiser)."""

import math

import pytest
import torch
import torch.nn.functional as F

from certify_fx.bounds import constants as C

scipy_optimize = pytest.importorskip("scipy.optimize")


def _sup_derivative(fn):
    def neg_derivative(v):
        x = torch.tensor(float(v), dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(fn(x), x)
        return -abs(g.item())

    best = 0.0
    for start in range(-6, 7):
        res = scipy_optimize.minimize_scalar(neg_derivative, bracket=(start - 0.5, start + 0.5))
        best = max(best, -res.fun)
    return best


@pytest.mark.parametrize(
    "fn,constant",
    [
        (F.gelu, C.GELU),
        (lambda x: F.gelu(x, approximate="tanh"), C.GELU_TANH),
        (F.silu, C.SILU),
        (F.mish, C.MISH),
        (torch.sigmoid, C.SIGMOID),
        (F.hardswish, C.HARDSWISH),
        (F.selu, C.SELU),
    ],
)
def test_constants_bound_sup_of_derivative(fn, constant):
    sup = _sup_derivative(fn)
    assert constant >= sup
    assert constant <= sup + 1e-4


def test_max_pool_overlap_constants():
    assert C.max_pool_constant((8, 8), (4, 4), 3, 2, 1) == pytest.approx(2.0)  # 3x3 s2: 2 windows per axis
    assert C.max_pool_constant((8, 8), (4, 4), 2, 2, 0) == pytest.approx(1.0)  # non-overlapping
    assert C.max_pool_constant((8, 8), (6, 6), 3, 1, 0) == pytest.approx(3.0)
    assert C.adaptive_max_pool_constant((5, 5), (1, 1)) == pytest.approx(1.0)
    assert C.GELU == pytest.approx(0.5 * (1 + math.erf(1)) + math.exp(-1) / math.sqrt(math.pi), rel=1e-9)
