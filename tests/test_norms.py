"""Operator norms: sound FFT/SVD bounds, adjoints, power iteration with persisted iterates."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certify_fx.bounds import PowerIteration, conv2d_norm_bound, dense_norm_bound, power_iteration
from certify_fx.bounds.norms import conv2d_adjoint

CONV_CASES = [
    # kernel, stride, padding (t, b, l, r), dilation, groups, input hw
    (3, 1, (1, 1, 1, 1), 1, 1, (8, 8)),
    (3, 2, (1, 1, 1, 1), 1, 1, (9, 7)),
    (5, 2, (2, 3, 0, 2), 1, 1, (10, 10)),
    (1, 2, (0, 0, 0, 0), 1, 1, (8, 8)),
    (4, 4, (0, 0, 0, 0), 1, 1, (16, 16)),
    (3, 1, (2, 2, 2, 2), 2, 1, (8, 8)),
    (3, 2, (1, 1, 1, 1), 2, 1, (9, 9)),
    (3, 1, (1, 1, 1, 1), 1, 2, (6, 6)),
    (3, 1, (1, 1, 1, 1), 1, 4, (6, 6)),
    (7, 2, (3, 3, 3, 3), 1, 1, (12, 12)),
    (3, 3, (0, 0, 0, 0), 1, 1, (10, 10)),
    (3, 1, (-1, 0, 1, 1), 1, 1, (8, 8)),
    (3, 1, (1, 1, 1, 1), 1, 1, (1, 1)),  # few frequencies: per-frequency Gram path
    (3, 1, (1, 1, 1, 1), 1, 1, (2, 1)),
]


def _conv(w, pads, s, d, g):
    return lambda x: F.conv2d(F.pad(x, (pads[2], pads[3], pads[0], pads[1])), w, stride=s, dilation=d, groups=g)


def _exact(f, c, hw):
    n = c * hw[0] * hw[1]
    jac = torch.autograd.functional.jacobian(lambda v: f(v.view(1, c, *hw)).flatten(), torch.zeros(n, dtype=torch.float64))
    return torch.linalg.matrix_norm(jac, 2).item()


@pytest.mark.parametrize("k,s,pads,d,g,hw", CONV_CASES)
def test_conv_bound_is_sound_and_adjoint_is_exact(k, s, pads, d, g, hw):
    w = torch.randn(4, 4 // g, k, k, dtype=torch.float64)
    f = _conv(w, pads, (s, s), (d, d), g)
    exact = _exact(f, 4, hw)
    bound = conv2d_norm_bound(w, hw, (s, s), pads, (d, d), g)
    assert bound.sound and bound.value >= exact
    if k == s and not any(pads):
        assert bound.value == pytest.approx(exact, rel=1e-5)  # kernel == stride: exact
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    y = torch.randn_like(f(x))
    adjoint = conv2d_adjoint(y, w, hw, (s, s), pads, (d, d), g)
    torch.testing.assert_close((f(x) * y).sum(), (x * adjoint).sum())


def test_grouped_conv_norm_is_max_over_groups_not_product():
    w = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    w[:, 0, 0, 0] = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert conv2d_norm_bound(w, (5, 5), groups=4).value == pytest.approx(3.0, rel=1e-5)


def test_reshaped_kernel_norm_can_be_too_small_but_ours_is_not():
    """spectral_norm of the reshaped kernel underestimates the conv operator; the FFT bound does not."""
    torch.manual_seed(3)
    w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    exact = _exact(_conv(w, (1, 1, 1, 1), (1, 1), (1, 1), 1), 1, (8, 8))
    reshaped = torch.linalg.matrix_norm(w.reshape(1, -1), 2).item()
    assert reshaped < exact / 2
    assert conv2d_norm_bound(w, (8, 8), padding=(1, 1, 1, 1)).value >= exact


def test_dense_bound_is_exact_svd():
    w = torch.randn(7, 5)
    assert dense_norm_bound(w).value == pytest.approx(torch.linalg.matrix_norm(w.double(), 2).item(), rel=2e-6)
    assert dense_norm_bound(w).value >= torch.linalg.matrix_norm(w.double(), 2).item()


def test_power_iteration_converges_from_below():
    w = torch.randn(6, 9, dtype=torch.float64)
    sigma, v = power_iteration(lambda x: x @ w.T, lambda y: y @ w, torch.randn(1, 9, dtype=torch.float64), 500, 1e-12)
    exact = torch.linalg.matrix_norm(w, 2).item()
    assert sigma.item() <= exact * (1 + 1e-9)
    assert sigma.item() == pytest.approx(exact, rel=1e-6)
    assert v.norm().item() == pytest.approx(1.0)


@pytest.mark.parametrize("layer,shape", [(nn.Conv2d(3, 6, 3, stride=2, padding=1), (3, 9, 9)),
                                         (nn.Linear(10, 4), (10,))])
def test_power_iteration_module_persists_iterates(layer, shape):
    norm = PowerIteration(layer, shape)
    assert "vector" in norm.state_dict()
    first = norm.vector.clone()
    sigma = norm(steps=1)
    assert not torch.equal(first, norm.vector)  # the iterate moved and is kept
    sigma.backward()  # gradient flows through one final application
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    converged = norm.converge(tol=1e-9, max_steps=5000).item()
    assert converged <= norm.upper_bound().value * (1 + 1e-6)
    # resuming from the persisted iterate: one more step barely changes the estimate
    assert norm(steps=1).item() == pytest.approx(converged, rel=1e-4)


def test_power_iteration_rejects_unsupported_layers():
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d"):
        PowerIteration(nn.ReLU(), (3,))
