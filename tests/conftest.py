import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's scripts: certify-fx, torchrun
# Proven norms are kept between processes (certify_fx.bounds.cache); the tests keep theirs in a
# directory of their own, so that they neither read nor fill the user's.
os.environ["CERTIFY_FX_CACHE"] = _NORM_CACHE = tempfile.mkdtemp(prefix="certify-fx-test-norms-")
atexit.register(shutil.rmtree, _NORM_CACHE, ignore_errors=True)
#: One thread per process, so that runs compared bit for bit do the same arithmetic; wide logs.
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def run_cli(*args, cwd=ROOT, **kw) -> subprocess.CompletedProcess:
    """``certify-fx ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run([str(BIN / "certify-fx"), *map(str, args)], capture_output=True, text=True, env=CLI_ENV,
                          cwd=cwd, **kw)


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


def empirical_margin_lipschitz(model, shape, i, j, restarts=4, steps=60, dtype=torch.float64):
    """Largest ||grad (f_i - f_j)|| and secant slope gradient ascent finds (a lower bound).

    Ops without a double backward (hardsigmoid) fall back to sampling gradient norms.
    """
    best = 0.0
    for r in range(restarts):
        x = torch.randn(8, *shape, dtype=dtype, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(steps):
            out = model(x)
            (g,) = torch.autograd.grad((out[:, i] - out[:, j]).sum(), x, create_graph=True)
            norms = g.flatten(1).norm(dim=1)
            best = max(best, norms.max().item())
            opt.zero_grad()
            try:
                (-norms.sum()).backward()
            except RuntimeError:  # no double backward: sample instead of ascending
                x = torch.randn_like(x).mul_(2).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=0.05)
                continue
            opt.step()
        # secant slopes along random short segments
        with torch.no_grad():
            d = torch.randn_like(x) * 1e-2
            a, b = model(x), model(x + d)
            slope = ((a[:, i] - a[:, j]) - (b[:, i] - b[:, j])).abs() / d.flatten(1).norm(dim=1)
            best = max(best, slope.max().item())
    return best


def pgd_l2(model, x, pred, eps, steps=40, restarts=0, seed=0):
    """Untargeted l2 PGD maximising the best wrong-class margin within the eps-ball (``eps`` a
    number or one radius per input); ``restarts`` more runs from random points of the ball.
    Returns the predictions at the last point of each run: (restarts + 1, N)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    radius = torch.as_tensor(eps, dtype=x.dtype).reshape(shape)
    generator = torch.Generator().manual_seed(seed)
    found = []
    for run in range(restarts + 1):
        start = torch.zeros_like(x)
        if run:
            start = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            start *= radius * torch.rand(len(x), generator=generator).reshape(shape) / start.flatten(1).norm(dim=1).reshape(shape)
        delta = start.requires_grad_(True)
        for _ in range(steps):
            out = model(x + delta)
            own = out.gather(1, pred[:, None])[:, 0]
            other = out.scatter(1, pred[:, None], -torch.inf).amax(1)
            (g,) = torch.autograd.grad((other - own).sum(), delta)
            with torch.no_grad():
                delta += 2.5 * radius / steps * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(shape)
                norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(shape)
                delta *= torch.clamp(radius / norm, max=1.0)
        with torch.no_grad():
            found.append(model(x + delta).argmax(1))
    return found[0] if restarts == 0 else torch.stack(found)
