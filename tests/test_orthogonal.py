"""SOC and HouseHolder: proven constants against exact norms of materialised operators and attacks."""

import math

import pytest
import torch
from torch import nn

import certify_fx as cfx
from certify_fx.nn import SOC, HouseHolder, MinMax
from certify_fx.nn.soc import truncated_exp_norm_bound


def _soc(channels_in, channels_out, terms, stride=1, scale=10.0, seed=0):
    torch.manual_seed(seed)
    layer = SOC(channels_in, channels_out, 3, stride=stride, train_terms=terms, eval_terms=terms, max_norm=1.5)
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.normal_()
    return layer.double().eval()


def _exact_norm(layer, shape):
    """Spectral norm of the layer's (affine) map, materialised in float64."""
    flat = math.prod(shape)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, *shape)).flatten(),
                                             torch.zeros(flat, dtype=torch.float64))
    return torch.linalg.matrix_norm(jac, 2).item()


def _bound_of(layer, shape):
    net = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3)).double().eval()
    net(torch.zeros(1, *shape, dtype=torch.float64))
    rows = [r for r in cfx.bound(net, shape, estimate_steps=0).nodes if r.op.startswith("SOC")]
    assert len(rows) == 1 and rows[0].sound
    return rows[0].factor


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soc_bound_is_at_or_above_the_exact_norm_and_within_one_percent(terms, seed):
    layer, shape = _soc(4, 4, terms, seed=seed), (4, 6, 6)
    exact, bound = _exact_norm(layer, shape), _bound_of(layer, shape)
    assert exact <= bound <= 1.01 * exact, (exact, bound)


@pytest.mark.parametrize("channels_in, channels_out, stride", [(2, 6, 1), (6, 2, 1), (2, 8, 2)])
def test_soc_channel_expansion_projection_and_stride_stay_sound(channels_in, channels_out, stride):
    layer, shape = _soc(channels_in, channels_out, terms=3, stride=stride), (channels_in, 8, 8)
    exact, bound = _exact_norm(layer, shape), _bound_of(layer, shape)
    assert exact <= bound <= 1.01 * max(exact, 1.0)


def test_more_terms_bring_the_bound_to_one():
    layer, shape = _soc(4, 4, terms=2), (4, 6, 6)
    bounds = []
    for terms in (2, 4, 8, 16):
        layer.eval_terms = terms
        bounds.append(_bound_of(layer, shape))
    assert bounds[0] > bounds[-1] and bounds[-1] == pytest.approx(1.0, abs=1e-5) and min(bounds) >= 1.0


def test_the_truncation_bound_is_never_below_the_polynomial_on_the_interval():
    for radius in (0.1, 0.7, 1.4, 3.0):
        for terms in range(1, 10):
            t = torch.linspace(0, radius, 20001, dtype=torch.float64)
            p = sum((1j * t) ** k / math.factorial(k) for k in range(terms + 1))
            assert truncated_exp_norm_bound(radius, terms) >= p.abs().max().item()
    assert truncated_exp_norm_bound(math.nan, 3) == math.inf


def test_training_uses_fewer_terms_and_the_bound_follows_the_mode():
    layer = SOC(4, 4, train_terms=2, eval_terms=10)
    assert layer.train().terms == 2 and layer.eval().terms == 10


def test_householder_is_minmax_at_initialisation_and_one_lipschitz_when_learned():
    x = torch.randn(64, 8, 3, 3)
    assert torch.allclose(HouseHolder(8)(x), MinMax()(x), atol=1e-6)  # up to rounding of cos, sin
    hh = HouseHolder(8)
    with torch.no_grad():
        hh.theta.uniform_(-math.pi, math.pi)
    y = torch.randn_like(x)
    slopes = (hh(x) - hh(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert slopes.max() <= 1 + 1e-6
    # gradient ascent on the secant slope ||f(a) - f(b)|| / ||a - b|| never finds one above 1
    a = torch.randn(16, 8, 3, 3, requires_grad=True)
    b = (a.detach() + 0.3 * torch.randn_like(a)).requires_grad_()
    optimizer = torch.optim.Adam([a, b], lr=0.05)
    for _ in range(100):
        slope = (hh(a) - hh(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        assert slope.max() <= 1 + 1e-5
        optimizer.zero_grad()
        (-slope.sum()).backward()
        optimizer.step()
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), hh, nn.Flatten(), nn.Linear(8 * 9, 4)).eval()
    rows = [r for r in cfx.bound(net, (3, 3, 3), estimate_steps=0).nodes if r.kind == "activation"]
    assert [r.factor for r in rows] == [1.0]


def _signed_distance_to_rays(points, theta):
    """Brute force: distance to the two rays at +-theta, negative inside the wedge."""
    def to_ray(angle):
        u = torch.tensor([math.cos(angle), math.sin(angle)], dtype=points.dtype)
        along = (points @ u).clamp_min(0)
        return (points - along[:, None] * u).norm(dim=1)

    distance = torch.minimum(to_ray(theta), to_ray(-theta))
    inside = torch.atan2(points[:, 1], points[:, 0]).abs() < theta
    return torch.where(inside, -distance, distance)


def test_projection_pooling_is_the_signed_distance_to_its_curve():
    from certify_fx.nn import ProjectionPool2d

    torch.manual_seed(0)
    pool = ProjectionPool2d(6).double()
    with torch.no_grad():
        pool.angle.copy_(torch.tensor([-2.0, 0.0, 1.5]))
    points = torch.randn(500, 3, 2, dtype=torch.float64) * 3
    z = torch.cat([points[..., 0], points[..., 1]], dim=1).view(500, 6, 1, 1)
    out = pool(z).view(500, 3)
    for c, theta in enumerate(pool.theta().tolist()):
        assert torch.allclose(out[:, c], _signed_distance_to_rays(points[:, c], theta), atol=1e-12)


def test_projection_pooling_is_one_lipschitz_and_bounded_so():
    from certify_fx.nn import ProjectionPool2d

    torch.manual_seed(1)
    pool = ProjectionPool2d(8)
    with torch.no_grad():
        pool.angle.normal_(0, 2)
    a = torch.randn(32, 8, 2, 2, requires_grad=True)
    b = (a.detach() + 0.5 * torch.randn_like(a)).requires_grad_()
    optimizer = torch.optim.Adam([a, b], lr=0.05)
    for _ in range(150):  # gradient ascent on the secant slope
        slope = (pool(a) - pool(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        assert slope.max() <= 1 + 1e-5
        optimizer.zero_grad()
        (-slope.sum()).backward()
        optimizer.step()
    x = torch.randn(8, 8, 2, 2, requires_grad=True)
    pool(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    net = nn.Sequential(nn.Conv2d(3, 8, 1), pool, nn.Flatten(), nn.Linear(16, 4)).eval()
    rows = [r for r in cfx.bound(net, (3, 2, 2), estimate_steps=0).nodes if r.kind == "activation"]
    assert [r.factor for r in rows] == [1.0] and rows[0].op == "projection pooling (signed distance)"


@pytest.mark.parametrize("img_size, in_chans, pool", [(28, 1, "projection"), (32, 3, "max")])
def test_lipconvnet_is_registered_and_its_bound_is_the_product_of_its_soc_constants(img_size, in_chans, pool):
    import timm

    from certify_fx.models.lipconvnet import DEPTHS

    assert all(timm.is_model(f"lipconvnet_{n}") for n in DEPTHS)
    model = timm.create_model("lipconvnet_5", num_classes=10, in_chans=in_chans, img_size=img_size, width=8,
                              pool=pool).eval()
    x = torch.rand(2, in_chans, img_size, img_size)
    assert model(x).shape == (2, 10) and model.forward_features(x).shape == (2, 8 * 32)
    bound = cfx.bound(model, (in_chans, img_size, img_size), estimate_steps=0)
    socs = [r.factor for r in bound.nodes if r.op.startswith("SOC")]
    assert bound.sound and len(socs) == 6 and all(1.0 <= f < 1.001 for f in socs)  # slightly above 1
    # 1-Lipschitz up to the SOC truncation: margins of the LLN head are at most ||w_i - w_j|| <= 2
    assert bound.margin.max() <= 2 * math.prod(socs) * (1 + 1e-5)
    lower = cfx.bound(model, (in_chans, img_size, img_size), estimate_steps=30).estimate.max()
    assert lower <= bound.margin.max()


@pytest.mark.parametrize("terms", [1, 3, 6])
def test_fast_gradients_keep_the_forward_and_input_gradient_and_approximate_the_kernel_gradient(terms):
    import copy

    torch.manual_seed(terms)
    exact = SOC(8, 8, train_terms=terms).double().train()
    fast = copy.deepcopy(exact)
    fast.fast_gradients = True
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    g = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    y, y_fast = exact(x), fast(x_fast)
    assert torch.allclose(y, y_fast, atol=1e-12)
    (y * g).sum().backward()
    (y_fast * g).sum().backward()
    assert torch.allclose(x.grad, x_fast.grad, atol=1e-12)  # the input gradient is exact
    error = (exact.weight.grad - fast.weight.grad).norm() / exact.weight.grad.norm()
    assert error == 0 if terms == 1 else error < 0.01  # one term is exact; more: the paper's approximation
    assert torch.equal(fast.eval()(x), exact.eval()(x))  # evaluation never uses the approximation


# -- BRO: block reflector orthogonal convolution --------------------------------------------------


def _bro(channels, rank=None, seed=0, kernel_size=3):
    from certify_fx.nn import BRO
    torch.manual_seed(seed)
    layer = BRO(channels, kernel_size, rank=rank)
    with torch.no_grad():
        layer.weight.normal_()  # far from its initialisation: a generic kernel
        layer.bias.normal_()
    return layer.double().eval()


@pytest.mark.parametrize("channels,rank,size,seed", [(4, 2, 5, 0), (6, 1, 4, 1), (6, 5, 6, 2), (8, 4, 3, 3)])
def test_bro_is_proven_at_most_one_and_the_bound_matches_the_exact_norm(channels, rank, size, seed):
    layer = _bro(channels, rank, seed)
    shape = (channels, size, size)
    exact = _exact_norm(layer, shape)
    net = nn.Sequential(layer, MinMax(), nn.Flatten(), nn.Linear(channels * size * size, 3)).double().eval()
    for limit in (0, 2048):  # bounded per frequency, and materialised
        rows = [r for r in cfx.bound(net, shape, estimate_steps=0, materialize_limit=limit).nodes if r.node == "_0"]
        assert len(rows) == 1 and rows[0].sound and rows[0].op == f"fourier conv {channels}->{channels}"
        bound = rows[0].factor
        assert exact <= bound * (1 + 1e-9) and bound <= 1 + 1e-5  # orthogonal response, cropped: at most 1
    assert exact > 0.9  # the crop loses little: the bound is not vacuous


def test_bro_operator_is_the_layer_and_its_adjoint():
    from certify_fx.bounds.operators import FourierConv2d
    layer = _bro(4, 2, seed=4)
    x, y = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    op = FourierConv2d((4, 5, 5), layer.frequency_response(7, 7).detach(), 1)
    assert torch.allclose(op.apply(x), layer(x) - layer.bias[:, None, None], atol=1e-12)
    assert torch.allclose((op.apply(x) * y).sum(), (x * op.adjoint(y)).sum(), atol=1e-10)
    # on the padded grid the circular part is a reflector per frequency: norms kept, up to the ridge
    grid = torch.randn(8, 4, 7, 7, dtype=torch.float64)
    ratio = FourierConv2d((4, 7, 7), op.response, 0).apply(grid).flatten(1).norm(dim=1) / grid.flatten(1).norm(dim=1)
    assert (ratio <= 1 + 1e-12).all() and (ratio > 0.9).all()


def test_bro_attack_finds_nothing_above_the_bound():
    layer = _bro(6, 3, seed=5).float()
    x = torch.randn(64, 6, 8, 8)
    delta = torch.randn_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.05)
    for _ in range(50):  # maximise ||f(x + d) - f(x)|| / ||d||
        ratio = (layer(x + delta) - layer(x)).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    assert ratio.max().item() <= 1 + 1e-5


def test_bronet_and_soc_blocks_are_bounded_soundly():
    import timm
    for name, kwargs in [("bronet_l6w32", {}), ("liresnet_l4w32", {"block": "soc"})]:
        model = timm.create_model(name, num_classes=10, in_chans=1, img_size=28, neck_dim=128, **kwargs).eval()
        b = cfx.bound(model, (1, 28, 28), estimate_steps=0)
        assert b.sound and torch.isfinite(b.margin).all()
        blocks = [r for r in b.nodes if r.node.startswith("blocks") and (r.kind == "linear" or r.op.startswith("SOC"))]
        assert len(blocks) == int(name.split("_l")[1][0])
        assert blocks and all(r.factor <= 1.01 for r in blocks), blocks  # orthogonal blocks stay near 1
    from certify_fx.nn import BRO
    with pytest.raises(ValueError, match="rank"):
        BRO(4, rank=4)


@pytest.mark.parametrize("limit", [0, 2048])
def test_nan_weights_in_bro_or_a_dense_layer_prove_nothing(limit):
    from certify_fx.nn import BRO
    for net in (nn.Sequential(BRO(4), MinMax(), nn.Flatten(), nn.Linear(100, 3)),
                nn.Sequential(nn.Flatten(), nn.Linear(100, 50), MinMax(), nn.Linear(50, 3))):
        with torch.no_grad():
            [p for p in net.parameters() if p.dim() > 1][0][0].fill_(float("nan"))
        b = cfx.bound(net.eval(), (4, 5, 5), estimate_steps=0, materialize_limit=limit)
        assert not b.sound and not torch.isfinite(b.margin).all()
