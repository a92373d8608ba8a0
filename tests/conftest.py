import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def jacobian_rows(model, input_shape, dtype=torch.float64):
    """The materialised Jacobian (m, prod(input_shape)) of a network that is linear (up to bias)."""
    model = model.to(dtype)
    x = torch.zeros(1, *input_shape, dtype=dtype)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, *input_shape))[0], x.flatten())
    return jac


def exact_margin_norms(jac):
    """||J_i - J_j|| for all pairs: the exact Lipschitz constant of each margin of a linear net."""
    diff = jac[:, None, :] - jac[None, :, :]
    return diff.norm(dim=-1)
