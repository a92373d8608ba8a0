"""certify(), GloRo and VRA: formulas, ties, reuse of the bound, and attacks on certified points."""

import dataclasses

import pytest
import torch
from torch import nn

import certify_fx as cfx
from certify_fx.certificates import ROUNDING_SLACK_ULPS
from certify_fx.nn import LLNLinear, MinMax
from conftest import pgd_l2


def small_net(classes=4):
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), MinMax(), nn.Conv2d(8, 8, 3, stride=2, padding=1), MinMax(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 32), MinMax(), LLNLinear(32, classes)).eval()


def test_radius_matches_pairwise_definition():
    logits = torch.randn(50, 6)
    k = torch.rand(6, 6) + 0.1
    k = (k + k.T) / 2
    k.fill_diagonal_(0)
    pred, radius = cfx.certified_radius(logits, k)
    for n in range(50):
        j = int(logits[n].argmax())
        f, kk = logits[n].double(), k.double()
        slack = ROUNDING_SLACK_ULPS * torch.finfo(torch.float32).eps
        expected = min(((f[j] - f[i] - slack * (f[j].abs() + f[i].abs())) / kk[j, i]).item() for i in range(6) if i != j)
        exact = min(((f[j] - f[i]) / kk[j, i]).item() for i in range(6) if i != j)
        assert pred[n] == j and radius[n].item() == pytest.approx(max(expected, 0.0), rel=1e-9)
        assert radius[n].item() <= exact


def test_ties_never_certify():
    # two classes with identical weights: equal logits everywhere and K = 0 between them
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[1].weight[1] = model[1].weight[0]
        model[1].bias[1] = model[1].bias[0]
        model[1].weight[2] = -10 * model[1].weight[0].abs() - 1
        model[1].bias[2] = -100.0
    result = cfx.bound(model, (1, 2, 2))
    assert result.margin[0, 1] == 0
    x = torch.rand(16, 1, 2, 2)
    cert = cfx.certify(model, x, eps=1e-6, bound=result)
    assert not cert.certified.any() and (cert.radius == 0).all()
    # equal logits with nonzero K do not certify either, at any eps > 0
    pred, radius = cfx.certified_radius(torch.zeros(5, 3), torch.ones(3, 3) - torch.eye(3))
    assert (radius == 0).all()


def test_certify_reuses_a_precomputed_bound(monkeypatch):
    model = small_net()
    result = cfx.bound(model, (1, 8, 8))
    x = torch.rand(32, 1, 8, 8)
    monkeypatch.setattr(cfx.certificates.LipschitzMethod, "prove", lambda *a, **k: pytest.fail("bound recomputed"))
    cert = cfx.certify(model, x, eps=0.01, bound=result)
    assert cert.pred.shape == (32,) and cert.sound


def test_unsound_bound_is_refused():
    model = small_net()
    result = dataclasses.replace(cfx.bound(model, (1, 8, 8)), sound=False)
    with pytest.raises(ValueError, match="not proven"):
        cfx.certify(model, torch.rand(2, 1, 8, 8), eps=0.1, bound=result)
    cert = cfx.certify(model, torch.rand(2, 1, 8, 8), eps=0.1, bound=result, use_estimate=True)
    assert not cert.sound


def test_attacks_never_flip_certified_points():
    torch.manual_seed(0)
    model = small_net()
    result = cfx.bound(model, (1, 8, 8))
    x = torch.rand(256, 1, 8, 8)
    radius = cfx.certify(model, x, eps=0.0, bound=result).radius
    eps = radius.quantile(0.5).item()
    cert = cfx.certify(model, x, eps=eps, bound=result)
    assert 0 < int(cert.certified.sum()) < 256
    robust = cert.certified
    attacked = pgd_l2(model, x[robust], cert.pred[robust], eps)
    assert torch.equal(attacked, cert.pred[robust])
    # and the attack is strong enough to flip some points at twice their certified radius
    weak = ~robust
    flipped = pgd_l2(model, x[weak], cert.pred[weak], 4 * eps) != cert.pred[weak]
    assert flipped.any()


def test_gloro_outputs_bottom_logit_and_predicts_abstain():
    model = small_net(classes=5)
    gloro = cfx.GloRo(model, eps=0.05, input_shape=(1, 8, 8)).eval()
    x = torch.rand(64, 1, 8, 8)
    out = gloro(x)
    assert out.shape == (64, 6)
    k = gloro.lipschitz_bound().margin
    logits = model(x)
    j = logits.argmax(1)
    expected = torch.stack([max(logits[n, i] + 0.05 * k[j[n], i] for i in range(5) if i != j[n]) for n in range(64)])
    torch.testing.assert_close(out[:, 5], expected.float())
    cert = cfx.certify(model, x, eps=0.05, bound=gloro.lipschitz_bound())
    pred = gloro.predict(x)
    assert torch.equal(pred == 5, ~cert.certified)
    assert torch.equal(pred[cert.certified], cert.pred[cert.certified])


def test_gloro_training_mode_gives_gradients_to_the_bound():
    model = small_net()
    gloro = cfx.GloRo(model, eps=0.1, input_shape=(1, 8, 8)).train()
    out = gloro(torch.rand(8, 1, 8, 8))
    out[:, -1].sum().backward()  # only the bottom logit: its gradient includes dK/dW
    head = model[-1].weight.grad
    assert head is not None and head.abs().sum() > 0


def test_verified_robust_accuracy_helper():
    model = small_net()
    data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))) for _ in range(3)]
    result = cfx.verified_robust_accuracy(model, data, eps=[0.0, 0.01, 10.0])
    assert 0 <= result["vra"][10.0] <= result["vra"][0.01] <= result["vra"][0.0] <= result["clean_accuracy"] <= 1
    assert result["vra"][10.0] == 0.0


def test_gloro_keeps_power_iteration_state_in_its_state_dict():
    model = small_net()
    gloro = cfx.GloRo(model, eps=0.1, input_shape=(1, 8, 8)).train()
    iterates = {k: v for k, v in gloro.state_dict().items() if "iterate" in k}
    assert iterates, "iterates are allocated from the traced shapes before the first step"
    before = {k: v.clone() for k, v in iterates.items()}
    gloro(torch.rand(4, 1, 8, 8))
    after = {k: v for k, v in gloro.state_dict().items() if "iterate" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # model parameters are stored once, not again through the compiler's traced copy
    assert sum(k.startswith("model.") for k in gloro.state_dict()) == len(model.state_dict())
    assert len(gloro.state_dict()) == len(model.state_dict()) + len(iterates)


def test_training_margin_has_finite_gradients_even_where_distances_are_zero():
    # sqrt'(0) is infinite: the diagonal and equal class rows must not turn into NaN gradients
    # (torch 2.13's clamp_min passes the gradient at exactly 0 and training diverged; 2.14 masks it)
    model = small_net()
    with torch.no_grad():
        model[-1].weight[1] = model[-1].weight[0]
        model[-1].bias[1] = model[-1].bias[0]
    gloro = cfx.GloRo(model, eps=0.1, input_shape=(1, 8, 8)).train()
    margin = gloro.compiler.estimate(steps=1)
    assert margin[0, 1] == 0
    margin.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def _pair_radius_brute_force(logits, margin, c, k):
    """The k-th smallest (f_c - f_i - slack) / K[c, i] over i != c, one pair at a time."""
    from certify_fx.certificates import ROUNDING_SLACK_ULPS
    f = logits.double()
    ulp = ROUNDING_SLACK_ULPS * torch.finfo(logits.dtype).eps
    pairs = sorted(max(0.0, float(f[c] - f[i] - ulp * (f[c].abs() + f[i].abs())) / float(margin[c, i]))
                   for i in range(len(f)) if i != c)
    return pairs[k - 1]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_radii_match_their_definition_and_k1_is_the_certified_radius(k):
    from certify_fx.certificates import certified_radius, top_k_radii
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(40, 7, generator=g) * 3
    w = torch.randn(7, 5, generator=g)
    margin = torch.cdist(w, w).double() * 1.3
    classes = top_k_radii(logits, margin, k)
    for n in range(0, 40, 7):
        for c in range(7):
            assert classes[n, c].item() == pytest.approx(_pair_radius_brute_force(logits[n], margin, c, k), rel=1e-12)
    if k == 1:
        pred, radius = certified_radius(logits, margin)
        assert torch.equal(classes.gather(1, pred[:, None])[:, 0], radius)
    bad = logits.clone()
    bad[3, 2] = float("nan")
    assert (top_k_radii(bad, margin, k)[3] == 0).all()
    with pytest.raises(cfx.CertifyFxError, match="top_k"):
        top_k_radii(logits, margin, 7)


def test_certify_top_k_is_sound_by_attack_and_weaker_than_top_1():
    from certify_fx.audit import attack
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), MinMax(), LLNLinear(32, 6)).eval()
    x = torch.rand(64, 1, 4, 4)
    y = model(x).topk(2, dim=1).indices[:, 1]  # the runner-up as the label: in the top 2, never the top 1
    bound = cfx.bound(model, (1, 4, 4))
    cert = cfx.certify(model, x, 0.05, bound, top_k=2)
    assert isinstance(cert, cfx.TopKCertificate) and cert.top_k == 2
    assert cert.accuracy(y) == 1.0 and cfx.certify(model, x, 0.05, bound).accuracy(y) == 0.0
    labels, radius = cert.defended(y)
    assert torch.equal(labels, y) and (radius > 0).any()
    inside = radius > 0
    flipped, _, _ = attack(model, x[inside], y[inside], 0.999 * radius[inside].float(), steps=30, top_k=2)
    assert not flipped.any()
    beyond, _, _ = attack(model, x[inside], y[inside], 20 * radius[inside].float() + 0.5, steps=30, top_k=2)
    assert beyond.any()  # the attack can push a label out of the top 2 when allowed to
    with pytest.raises(cfx.CertifyFxError, match="top_k"):
        cfx.certify(model, x, 0.05, bound, top_k=0)
