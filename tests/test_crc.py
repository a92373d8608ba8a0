"""CRC-Lip: curvature bounds, the dual certificate, and certify(method="crc") on LipConvnet."""

import math

import pytest
import torch
from torch import nn

import certify_fx
from certify_fx.bounds.compiler import BoundCompiler
from certify_fx.certificates import pair_radii
from certify_fx.certificates.crc import curvature_bound, curvature_radius, margin_curvature
from certify_fx.errors import CertifyFxError
from certify_fx.models.lipconvnet import LipConvnet
from certify_fx.nn import SoftplusMLP
from conftest import ROOT, pgd_l2


def _head(seed: int, features: int = 2, classes: int = 3, hidden: int = 16, scale: float = 3.0) -> SoftplusMLP:
    torch.manual_seed(seed)
    head = SoftplusMLP(features, classes, hidden).double()
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(scale)
    return head


@pytest.mark.parametrize("seed", range(4))
def test_margin_curvature_bounds_every_sampled_hessian(seed):
    head = _head(seed, features=5, classes=4, hidden=7 if seed % 2 else 3)
    lower, upper = margin_curvature(head)
    for y in torch.randn(20, 5, dtype=torch.float64) * 3:
        hessians = [torch.autograd.functional.hessian(lambda t, i=i: head(t)[i], y) for i in range(4)]
        for i in range(4):
            for j in range(4):
                if i == j:
                    continue
                eig = torch.linalg.eigvalsh(hessians[i] - hessians[j])
                assert eig[0] >= -lower[i, j] - 1e-12 and eig[-1] <= upper[i, j] + 1e-12  # the test's own rounding
    assert torch.equal(lower, upper.T)


def _boundary_distance_on_a_grid(head, y0, label, other, reach=6.0, n=800):
    """The smallest distance from y0 to a grid point where class ``other`` is not below ``label``:
    at least the true distance to the boundary, so a certificate above it is false."""
    radii = torch.linspace(0, reach, n, dtype=torch.float64)[1:]
    angles = torch.linspace(0, 2 * math.pi, 4 * n, dtype=torch.float64)
    points = y0 + radii[:, None, None] * torch.stack([angles.cos(), angles.sin()], -1)[None]
    with torch.no_grad():
        logits = head(points.reshape(-1, 2)).reshape(len(radii), len(angles), -1)
    crossed = (logits[..., label] - logits[..., other] <= 0).any(dim=1)
    return radii[crossed.nonzero()[0, 0]].item() if crossed.any() else math.inf


@pytest.mark.parametrize("seed", range(6))
def test_curvature_radius_never_exceeds_the_true_distance_and_is_close_to_it(seed):
    head = _head(seed)
    y0 = torch.randn(1, 2, dtype=torch.float64)
    with torch.no_grad():
        label = head(y0).argmax(1)
    others = torch.tensor([[c for c in range(3) if c != label.item()]])
    lower, upper = margin_curvature(head)
    radius = curvature_radius(head, y0, label, lower, upper, others)[0]
    for r, other in zip(radius.tolist(), others[0].tolist()):
        grid = _boundary_distance_on_a_grid(head, y0, label.item(), other)
        assert r <= grid, (r, grid)
        if math.isfinite(grid) and r > 0:
            assert r >= 0.5 * grid  # CRC is exact for many inputs; a solver that gives up would fail here


def test_curvature_radius_falls_back_to_zero_when_the_tolerance_is_not_met():
    head = _head(0, features=4)
    y0 = torch.randn(5, 4, dtype=torch.float64)
    label = head(y0).argmax(1).detach()
    others = torch.stack([(label + 1) % 3, (label + 2) % 3], 1)
    lower, upper = margin_curvature(head)
    assert (curvature_radius(head, y0, label, lower, upper, others) > 0).any()
    assert (curvature_radius(head, y0, label, lower, upper, others, tol=-1.0) == 0).all()  # unmeetable


def test_output_lipschitz_bounds_the_exact_jacobian_norm_of_a_feature_extractor():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Flatten()).eval()
    bound = BoundCompiler(body, (1, 6, 6)).output_lipschitz()
    x = torch.randn(1, 1, 6, 6)
    jacobian = torch.autograd.functional.jacobian(lambda t: body(t[None])[0], x[0]).reshape(-1, 36)
    assert bound.sound and torch.linalg.matrix_norm(jacobian, ord=2) <= bound.bound


@pytest.fixture(scope="module")
def lipconvnet_mlp():
    torch.manual_seed(0)
    model = LipConvnet(10, depth=5, width=4, in_chans=1, img_size=28, pool="projection", head="mlp",
                       eval_terms=8).eval()
    with torch.no_grad():  # more curvature than at initialisation, so the two certificates differ
        model.head.fc1.weight.mul_(4)
        model.head.fc2.weight.mul_(4)
    return model, curvature_bound(model, (1, 28, 28))


def test_certify_crc_keeps_predictions_and_never_lowers_a_radius(lipconvnet_mlp):
    model, cb = lipconvnet_mlp
    assert cb.sound and 1.0 <= cb.features < 1.001  # the SOC layers are slightly above 1
    x = torch.rand(16, 1, 28, 28)
    lipschitz = certify_fx.certify(model, x, 0.1, cb.lipschitz)
    crc = certify_fx.certify(model, x, 0.1, cb, method="crc")
    assert torch.equal(crc.pred, lipschitz.pred) and crc.sound
    assert (crc.radius >= lipschitz.radius).all() and (crc.radius > 1.01 * lipschitz.radius).any()
    fewer = certify_fx.certify(model, x, 0.1, cb, method="crc", crc_classes=2)
    assert (fewer.radius >= lipschitz.radius).all() and (fewer.radius <= crc.radius + 1e-12).all()


def test_no_attack_inside_a_crc_radius_flips_the_prediction(lipconvnet_mlp):
    model, cb = lipconvnet_mlp
    torch.manual_seed(1)
    x = torch.rand(16, 1, 28, 28)
    cert = certify_fx.certify(model, x, 0.0, cb, method="crc")
    attacked = pgd_l2(model, x, cert.pred, 0.999 * cert.radius.float(), steps=60, restarts=1)
    assert (attacked == cert.pred).all()


@pytest.fixture(scope="module", params=["lln", "crc"])
def trained_fashion_mnist_lipconvnet(request, tmp_path_factory):
    """A LipConvnet-5 (width 4) trained briefly on real Fashion-MNIST with each recipe."""
    from certify_fx.train import Trainer, load_recipe

    recipe = load_recipe(ROOT / "recipes" / f"fashion_mnist_lipconvnet_{request.param}.yaml", [
        f"output_dir={tmp_path_factory.mktemp(request.param)}", "epochs=1", "data.train_subset=3072",
        "data.eval_subset=256", "data.batch_size=64", "optim.warmup_epochs=0.1", "bound.converge_steps=0",
        "model.kwargs.width=4", "model.kwargs.train_terms=3", "model.kwargs.eval_terms=8"])
    trainer = Trainer(recipe)
    trainer.fit()
    return request.param, trainer.model.eval(), trainer.test_set


def test_pgd_never_flips_a_point_certified_on_a_trained_fashion_mnist_lipconvnet(trained_fashion_mnist_lipconvnet):
    kind, model, test_set = trained_fashion_mnist_lipconvnet
    x = torch.stack([test_set[i][0] for i in range(256)])
    y = torch.tensor([int(test_set[i][1]) for i in range(256)])
    method = "crc" if kind == "crc" else "lipschitz"
    bound = curvature_bound(model, (1, 28, 28)) if kind == "crc" else certify_fx.bound(model, (1, 28, 28), 0)
    cert = certify_fx.certify(model, x, 0.0, bound, method=method)
    robust = (cert.pred == y) & (cert.radius > 0.05)
    assert cert.accuracy(y) > 0.5 and robust.sum() >= 20  # trained, and the check is not vacuous
    chosen = robust.nonzero()[:, 0][:32]
    attacked = pgd_l2(model, x[chosen], cert.pred[chosen], 0.999 * cert.radius[chosen].float(), steps=30,
                      restarts=1)
    assert (attacked == cert.pred[chosen]).all()


def test_crc_needs_a_softplus_mlp_classifier_and_a_known_method():
    model = LipConvnet(10, depth=5, width=4, in_chans=1, img_size=28).eval()
    with pytest.raises(CertifyFxError, match="SoftplusMLP.*head='mlp'"):
        certify_fx.certify(model, torch.rand(2, 1, 28, 28), 0.1, method="crc")
    with pytest.raises(CertifyFxError, match="unknown certificate method 'crcc'; choose one of lipschitz, crc"):
        certify_fx.certify(model, torch.rand(2, 1, 28, 28), 0.1, method="crcc")


def test_pair_radii_agree_with_certified_radius():
    logits = torch.randn(32, 5)
    margin = torch.rand(5, 5) + 0.5
    pred, pairs = pair_radii(logits, margin)
    assert torch.equal(pairs.amin(1), certify_fx.certified_radius(logits, margin)[1])
    assert torch.isinf(pairs.gather(1, pred[:, None])).all()


def test_the_training_penalty_is_at_least_the_proven_curvature():
    from certify_fx.losses import curvature_penalty, loss_options

    for seed in range(3):
        head = _head(seed, features=6, classes=5, hidden=9)
        lower, upper = margin_curvature(head)
        assert curvature_penalty(head).item() >= upper.max().item() * (1 - 1e-9)
    assert loss_options("crc_lip") == {"gamma": float, "steps": int}  # features/head come from the trainer


def test_a_crc_lip_recipe_trains_and_certifies_with_either_certificate(tmp_path):
    import json

    from certify_fx.train import Trainer, load_recipe
    from conftest import run_cli

    recipe = load_recipe(ROOT / "recipes" / "fashion_mnist_lipconvnet_crc.yaml", [
        f"output_dir={tmp_path}", "epochs=2", "data.name=synthetic", "data.batch_size=32", "data.eval_batch_size=64",
        "data.synthetic={num_classes: 4, in_chans: 1, img_size: 28, size: 128, test_size: 64, noise: 0.25}",
        "model.kwargs={width: 4, img_size: 28, pool: projection, head: mlp, train_terms: 2, eval_terms: 6}",
        "bound.eval_every=2"])
    trainer = Trainer(recipe)
    history = trainer.fit()
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["sound"]
    lipschitz = json.loads(run_cli("certify", tmp_path / "checkpoint.pt", "--json").stdout)
    crc = json.loads(run_cli("certify", tmp_path / "checkpoint.pt", "--method", "crc", "--json").stdout)
    assert crc["method"] == "crc" and crc["clean_accuracy"] == lipschitz["clean_accuracy"]
    assert all(crc["vra"][e] >= v for e, v in lipschitz["vra"].items())


def test_crc_refuses_a_model_whose_output_is_not_exactly_the_head_of_its_features():
    def model(**changes):
        m = LipConvnet(10, depth=5, width=4, in_chans=1, img_size=28, head="mlp").eval()
        for name, value in changes.items():
            setattr(m.head, name, value)
        return m

    x = torch.rand(2, 1, 28, 28)

    class Scaled(LipConvnet):  # a forward that is not forward_head(forward_features(x))
        def forward(self, x):
            return 100 * super().forward(x)

    with pytest.raises(CertifyFxError, match="by construction.*Scaled does not"):
        certify_fx.certify(Scaled(10, depth=5, width=4, in_chans=1, img_size=28, head="mlp").eval(), x, 0.1,
                           method="crc")
    with pytest.raises(CertifyFxError, match="exactly Linear -> SmoothSoftplus -> Linear.*head.act: Softplus"):
        certify_fx.certify(model(act=nn.Softplus()), x, 0.1, method="crc")
    with pytest.raises(CertifyFxError, match="head.fc2: LLNLinear"):
        certify_fx.certify(model(fc2=certify_fx.nn.LLNLinear(32 * 4, 10)), x, 0.1, method="crc")
    hooked = model()
    hooked.head.fc2.register_forward_hook(lambda mod, i, o: 100 * o)
    with pytest.raises(CertifyFxError, match="head.fc2 has a forward hook"):
        certify_fx.certify(hooked, x, 0.1, method="crc")
