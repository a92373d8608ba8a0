"""The two capture paths: symbolic tracing, and torch.export where tracing fails.

Networks written as the field's code bases write them (``tests/peer_models.py``) are bounded
soundly through ``torch.export`` (checked against gradient ascent and PGD), the ones that are
1-Lipschitz by construction within 1.05x of their nominal constant, and what has no rule is
refused in one line naming the node, the op and the model's source line. The random graphs of
the property suite are sound on the export path too.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certify_fx as cfx
import peer_models
from certify_fx.bounds import aten
from certify_fx.bounds.capture import capture, export_graph
from certify_fx.bounds.module_state import ModuleState
from certify_fx.bounds.residual import gated_residual_bound
from conftest import empirical_margin_lipschitz, pgd_l2
from graphs import SHAPE as GRAPH_SHAPE
from graphs import VOCABULARY, draw

#: stand-ins whose code symbolic tracing cannot follow (Python on weights or on the input's shape)
UNTRACEABLE = ("liresnet", "soc", "aol", "sll", "orthogonium", "shape_branch")


def check_sound(model: nn.Module, shape: tuple[int, ...], bound, pairs=((0, 1), (1, 2), (3, 0))) -> None:
    assert bound.sound and bound.finite
    double = copy.deepcopy(model).double()
    for i, j in pairs:
        lower = empirical_margin_lipschitz(double, shape, i, j, restarts=2, steps=30)
        assert bound.margin[i, j].item() >= lower * (1 - 1e-6), (i, j, bound.margin[i, j].item(), lower)
    x = torch.rand(64, *shape) * 2 - 1
    cert = cfx.certify(model, x, 0.0, bound=bound)
    certified = cert.radius > 0
    if certified.any():
        radius = cert.radius[certified].clamp(max=10.0).float().view(-1, *([1] * len(shape)))
        flipped = pgd_l2(model, x[certified], cert.pred[certified], 0.999 * radius) != cert.pred[certified]
        assert not flipped.any()


@pytest.mark.parametrize("name", UNTRACEABLE)
def test_the_field_writes_networks_symbolic_tracing_cannot_follow(name):
    with pytest.raises(cfx.TraceError):
        cfx.bound(peer_models.build(name), peer_models.SHAPE, estimate_steps=0, capture="symbolic")


@pytest.mark.parametrize("name", sorted(peer_models.STAND_INS))
def test_peer_networks_are_bounded_soundly(name):
    model = peer_models.build(name)
    bound = cfx.bound(model, peer_models.SHAPE, estimate_steps=0)
    check_sound(model, peer_models.SHAPE, bound)
    if getattr(model, "nominal", None) is not None:
        # a 1-Lipschitz body: K[i, j] is at most the head's ||w_i - w_j|| (times 1.05)
        rows = peer_models.head_rows(model)
        assert (bound.margin <= 1.05 * model.nominal * rows + 1e-9).all(), (bound.margin / rows).nanmean()


@pytest.mark.parametrize("name", sorted(peer_models.REFUSED))
def test_what_has_no_rule_is_refused_naming_node_op_and_source_line(name):
    model, op = peer_models.REFUSED[name]
    with pytest.raises(cfx.UnsupportedNodeError) as info:
        cfx.bound(peer_models.build(name), peer_models.SHAPE, estimate_steps=0, capture="export")
    message = str(info.value)
    assert "\n" not in message and op in message and "node '" in message
    assert re.search(r"peer_models\.py:\d+ \(", message), message


def test_both_paths_give_the_same_bound_where_both_capture():
    for name in ("cayley_dense", "bcop", "cpl", "torchlip", "sandwich", "cayley_fft"):
        model = peer_models.build(name)
        symbolic = cfx.bound(model, peer_models.SHAPE, estimate_steps=0, capture="symbolic")
        exported = cfx.bound(model, peer_models.SHAPE, estimate_steps=0, capture="export")
        assert torch.allclose(symbolic.margin, exported.margin, rtol=1e-9, atol=0), name


@pytest.mark.parametrize("index", range(0, len([o for o in VOCABULARY if o.autograd]), 3))
def test_random_graphs_are_sound_on_the_export_path(index):
    model = draw(index, seed=3)
    try:
        bound = cfx.bound(model, GRAPH_SHAPE, estimate_steps=0, capture="export")
    except cfx.CertifyFxError as exc:  # a module rule the export path inlines, and no rule for its insides
        assert "node '" in str(exc)
        return
    check_sound(model, GRAPH_SHAPE, bound)


def test_exported_graphs_read_the_models_own_weights():
    model = peer_models.build("liresnet")
    compiler = cfx.BoundCompiler(model, peer_models.SHAPE, capture="export")
    before = compiler.sound_bound(estimate_steps=0).margin
    with torch.no_grad():
        model.kernels.mul_(3)
    after = compiler.sound_bound(estimate_steps=0).margin
    assert torch.allclose(after, cfx.bound(model, peer_models.SHAPE, estimate_steps=0).margin)
    assert not torch.allclose(before, after)


def test_capturing_with_export_leaves_the_model_as_it_was():
    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8))
            self.cache = None

        def forward(self, x):
            if self.cache is None:
                self.cache = self.w / self.w.norm()
            if len(x.shape) == 4:
                x = x.flatten(1)
            return F.linear(x, self.cache)

    model = Caching().eval()
    state = ModuleState(model)
    bound = cfx.bound(model, (2, 2, 2), estimate_steps=0)
    assert model.cache is None and not state.changes()
    assert bound.sound


def test_an_export_failure_says_why_for_both_paths():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x.flatten(1) if x.sum() > 0 else -x.flatten(1)

    with pytest.raises(cfx.TraceError, match="torch.export could not capture"):
        capture(DataDependent(), (4,))


def test_capture_mode_is_checked():
    with pytest.raises(cfx.CertifyFxError, match="capture must be one of"):
        cfx.bound(nn.Linear(4, 2), (4,), capture="jit")


def test_aten_ops_are_read_as_the_torch_forms_with_rules():
    model = peer_models.build("orthogonium")
    gm = export_graph(model, peer_models.SHAPE)
    left = [n for n in gm.graph.nodes if n.op == "call_function" and aten.is_aten(n.target)]
    # what stays ATen computes weights (constants): solve, matrix norms, the identity
    assert left and all(re.search("linalg|eye", str(n.target)) for n in left), [str(n.target) for n in left]
    targets = {n.target for n in gm.graph.nodes}
    assert torch.conv2d in targets and torch.max in targets and torch.min in targets


def test_a_python_wrapper_is_never_bound_by_position_when_its_parameters_differ():
    # aten.elu(self, alpha, scale, input_scale) against F.elu(input, alpha, inplace): position 2 differs
    assert aten.torch_form(torch.ops.aten.elu.default, 2) == ("call_function", F.elu)
    assert aten.torch_form(torch.ops.aten.elu.default, 3) is None


# -- the gated residual certificate (SLL, CPL) --------------------------------------------------
def _sll(w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = (torch.abs(w @ w.T) * q[None, :] / q[:, None]).sum(1)
    return torch.eye(w.shape[1], dtype=w.dtype), -2 * w.T / t[None, :], w


@pytest.mark.parametrize("seed", range(8))
def test_the_gated_residual_bound_holds_for_every_gate(seed):
    g = torch.Generator().manual_seed(seed)
    n, h = 6, 5
    a = torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(n, n, generator=g, dtype=torch.float64)
    b = torch.randn(n, h, generator=g, dtype=torch.float64)
    c = torch.randn(h, n, generator=g, dtype=torch.float64)
    bound, _ = gated_residual_bound(a, b, c)
    for _ in range(200):  # every slope pattern D in [0, 1]^h gives a Jacobian A + B D C
        d = torch.rand(h, generator=g, dtype=torch.float64)
        d = torch.where(torch.rand(h, generator=g, dtype=torch.float64) < 0.5, d.round(), d)
        assert torch.linalg.matrix_norm(a + b * d[None, :] @ c, ord=2) <= bound


@pytest.mark.parametrize("seed", range(4))
def test_sll_and_cpl_layers_are_proven_one_lipschitz(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    a, b, c = _sll(w, torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
    bound, residual = gated_residual_bound(a, b, c)
    assert bound <= 1 + 1e-5 and residual <= 1e-9
    cpl = -2 / torch.linalg.matrix_norm(w, ord=2) ** 2 * w.T
    bound, residual = gated_residual_bound(torch.eye(7, dtype=torch.float64), cpl, w)
    assert bound <= 1 + 1e-5 and residual <= 1e-9
    # a gate too strong for the identity: lambda_max(C^T S C) = 4, the bound is 3, and so is the norm
    strong = -4 / torch.linalg.matrix_norm(w, ord=2) ** 2 * w.T
    bound, _ = gated_residual_bound(torch.eye(7, dtype=torch.float64), strong, w)
    assert abs(bound - 3) < 1e-4


def test_the_cli_bounds_a_model_file_symbolic_tracing_cannot_follow(tmp_path):
    import json
    import subprocess
    import sys

    path = peer_models.__file__
    command = [sys.executable, "-m", "certify_fx", "bound", f"{path}:SLLStyle", "--input-size", "2,6,6", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sound"] and data["penultimate"] <= 1 + 1e-5
    symbolic = subprocess.run(command + ["--capture", "symbolic"], capture_output=True, text=True, timeout=600)
    assert symbolic.returncode != 0 and "--capture auto" in symbolic.stderr


def test_a_fourier_stretch_with_an_input_dependent_index_is_refused():
    class Gather(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2 * 4 * 3 * 2, 4)

        def forward(self, x):
            spectrum = torch.fft.rfft2(x)
            index = spectrum.real.flatten(1).argmax(1) % 3  # picks frequencies by the input's values
            picked = spectrum[torch.arange(x.shape[0])[:, None], :, :, index[:, None]]
            return self.fc(torch.view_as_real(torch.fft.ifft(picked)).flatten(1))

    with pytest.raises(cfx.CertifyFxError, match="node '"):
        cfx.bound(Gather().eval(), (2, 4, 4), estimate_steps=0)


def test_python_wrappers_with_the_schemas_parameters_are_read_by_position():
    # aten.split.Tensor(self, split_size, dim) is Tensor.split(self, split_size, dim), a Python method
    assert aten.torch_form(torch.ops.aten.split.Tensor, 3) is not None

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2 * 4 * 4, 4)

        def forward(self, x):
            a, b = x.split(1, dim=1)
            return self.fc(torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1).flatten(1))

    model = Split().eval()
    exported = cfx.bound(model, (2, 4, 4), estimate_steps=0, capture="export")
    assert torch.allclose(exported.margin, cfx.bound(model, (2, 4, 4), estimate_steps=0, capture="symbolic").margin)
