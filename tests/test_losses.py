"""Losses against their definitions, computed here with explicit per-class loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from certify_fx.losses import (LOSSES, calibrated_sigma, cll, create_loss, emma, gloro_ce, gloro_logits, needs_features,
                                trades)
from certify_fx.nn import SoftplusMLP


def _batch(n=6, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, m, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(m, (n,), generator=g)
    w = torch.randn(m, 7, generator=g, dtype=torch.float64)
    margin = torch.cdist(w, w)  # a valid margin matrix: ||w_i - w_j||
    return logits, labels, margin


def _bottom_reference(f, K, eps):
    out = []
    for row in f:
        j = int(row.argmax())
        out.append(max(row[i] + eps * K[j, i] for i in range(len(row)) if i != j))
    return torch.stack(out)


def test_gloro_ce_is_cross_entropy_of_the_bottom_augmented_logits():
    f, y, K = _batch()
    aug = torch.cat([f, _bottom_reference(f, K, 0.3)[:, None]], 1)
    ref = torch.stack([-(aug[n, y[n]] - torch.logsumexp(aug[n], 0)) for n in range(len(y))]).mean()
    assert torch.allclose(gloro_ce(f, y, K, 0.3), ref)


def test_trades_matches_its_definition():
    f, y, K = _batch()
    lam, eps = 1.7, 0.25
    aug = torch.cat([f, _bottom_reference(f, K, eps)[:, None]], 1)
    terms = []
    for n in range(len(y)):
        p = torch.softmax(f[n], 0)
        log_q = aug[n] - torch.logsumexp(aug[n], 0)
        clean = -(f[n, y[n]] - torch.logsumexp(f[n], 0))
        robust = -sum(p[i] * log_q[i] for i in range(f.shape[1]))  # the bottom class has target 0
        terms.append(clean + lam * robust)
    assert torch.allclose(trades(f, y, K, eps, lam=lam), torch.stack(terms).mean())
    # lam = 0 is plain cross-entropy
    assert torch.allclose(trades(f, y, K, eps, lam=0.0), F.cross_entropy(f, y))


def test_emma_hand_computed_case():
    f = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    K = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]], dtype=torch.float64)
    # kappa_1 = (2 - 1) / 2 = 0.5 -> clipped to 0.3; kappa_2 = 2 / 4 = 0.5 -> 0.3
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1 + 0.3 * 2) + math.exp(0 + 0.3 * 4)))
    assert emma(f, torch.tensor([0]), K, 0.3).item() == pytest.approx(expected, rel=1e-12)
    # a large eps leaves the kappas unclipped: both margins grow to exactly f_y (0.5 * K)
    expected = -math.log(math.exp(2) / (3 * math.exp(2)))
    assert emma(f, torch.tensor([0]), K, 10.0).item() == pytest.approx(expected, rel=1e-12)
    # label 1 is misclassified against class 0 (kappa < 0 -> 0) and certified against class 2
    expected = -math.log(math.exp(1) / (math.exp(2) + math.exp(1) + math.exp(0 + 0.3 * 1)))
    assert emma(f, torch.tensor([1]), K, 0.3).item() == pytest.approx(expected, rel=1e-12)


def _emma_shifted(f, yn: int, K, eps: float, low: float = 0.0) -> torch.Tensor:
    """One sample's EMMA logits by the definition: ``f_i + clip(kappa_i, low, eps) K[y, i]``, the label's
    own logit unchanged."""
    shifted = []
    for i in range(f.shape[0]):
        kappa = float((f[yn] - f[i]) / K[yn, i]) if i != yn else 0.0
        shifted.append(f[i] + (0.0 if i == yn else min(max(kappa, low), eps)) * K[yn, i])
    return torch.stack(shifted)


def test_emma_matches_definition_on_a_batch():
    f, y, K = _batch(n=8, m=6, seed=3)
    eps = 0.4
    terms = [-(f[n, int(y[n])] - torch.logsumexp(_emma_shifted(f[n], int(y[n]), K, eps), 0)) for n in range(len(y))]
    assert torch.allclose(emma(f, y, K, eps), torch.stack(terms).mean())


def test_emma_is_cross_entropy_when_nothing_is_certified():
    f, y, K = _batch()
    assert torch.allclose(emma(f, y, K, 0.0), F.cross_entropy(f, y))
    wrong = f.clone()
    wrong.scatter_(1, y[:, None], f.min(1).values[:, None] - 1.0)  # the label has the lowest logit
    assert torch.allclose(emma(wrong, y, K, 0.5), F.cross_entropy(wrong, y))


def test_emma_passes_no_gradient_through_eps_i():
    f, y, K = _batch()
    eps = 0.3
    f1, K1 = f.clone().requires_grad_(), K.clone().requires_grad_()
    emma(f1, y, K1, eps).backward()
    with torch.no_grad():  # the same loss with eps_i frozen by hand
        k = K[y]
        eps_i = ((f.gather(1, y[:, None]) - f) / k.clamp_min(1e-30)).clamp(0, eps).scatter(1, y[:, None], 0.0)
    f2, K2 = f.clone().requires_grad_(), K.clone().requires_grad_()
    F.cross_entropy(f2 + eps_i * K2[y], y).backward()
    assert torch.allclose(f1.grad, f2.grad)
    assert torch.allclose(K1.grad, K2.grad)


def test_emma_min_fraction_clip():
    f = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # misclassified: kappa < 0
    K = torch.tensor([[0.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    expected = -math.log(1 / (1 + math.exp(1 + 0.01 * 0.5 * 2)))
    assert emma(f, torch.tensor([0]), K, 0.5, min_fraction=0.01).item() == pytest.approx(expected)


def test_cll_matches_definition():
    f, y, K = _batch(n=7, m=4, seed=5)
    eps, p, lam = 0.5, 0.02, 0.1
    sigma = 2 * eps / (math.log((1 - p) / p) - math.log(p / (1 - p)))
    terms = []
    for n in range(len(y)):
        yn = int(y[n])
        g = torch.stack([-eps / sigma + 0 * f[n, i] if i == yn else eps / sigma + (f[n, i] - f[n, yn]) / (sigma * K[i, yn])
                         for i in range(f.shape[1])])
        terms.append(-(g[yn] - torch.logsumexp(g, 0)))
    expected = torch.stack(terms).mean() + lam * K.max() ** 2
    assert torch.allclose(cll(f, y, K, eps, p=p, lam=lam), expected)


def test_cll_binary_case_is_the_calibrated_logistic():
    f, _, _ = _batch(n=9, m=2, seed=7)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0])
    K = torch.tensor([[0.0, 1.7], [1.7, 0.0]], dtype=torch.float64)
    eps, p = 0.3, 0.05
    sigma = calibrated_sigma(eps, p)
    other = 1 - y
    margin = f.gather(1, y[:, None])[:, 0] - f.gather(1, other[:, None])[:, 0]  # f_y - f_i
    # -log sigmoid(margin / (sigma K) - 2 eps / sigma): a logistic in the K-normalised margin, centred at eps
    expected = -F.logsigmoid(margin / (sigma * 1.7) - 2 * eps / sigma).mean()
    assert torch.allclose(cll(f, y, K, eps, p=p), expected)


def test_calibrated_sigma_puts_probability_p_at_the_margin_edges():
    eps, p = 0.25, 0.01
    s = calibrated_sigma(eps, p)
    assert torch.sigmoid(torch.tensor(eps / s)).item() == pytest.approx(1 - p)
    assert torch.sigmoid(torch.tensor(-eps / s)).item() == pytest.approx(p)
    with pytest.raises(ValueError, match="slack"):
        calibrated_sigma(eps, 0.7)


def test_cll_detach_margin_leaves_only_the_penalty_on_k():
    f, y, K = _batch()
    K1 = K.clone().requires_grad_()
    cll(f, y, K1, 0.3, lam=0.5, detach_margin=True).backward()
    at_max = (K == K.max()).to(K.dtype)  # K is symmetric: the maximum appears twice
    assert torch.allclose(K1.grad, at_max * 2 * 0.5 * K.max() / at_max.sum())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_vectorised_for_a_thousand_classes(name):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(16, 1000, generator=g, requires_grad=True)
    w = torch.randn(1000, 32, generator=g)
    K = torch.cdist(w, w).requires_grad_()
    y = torch.randint(1000, (16,), generator=g)
    if needs_features(name):  # trains on the classifier's input: gradients reach the features
        features = torch.randn(16, 32, generator=g, requires_grad=True)
        loss = create_loss(name)(f, y, K, 0.1, features=features, head=SoftplusMLP(32, 1000))
        f = features
    else:
        loss = create_loss(name)(f, y, K, 0.1)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(f.grad).all()


def test_ties_never_certify_in_the_gloro_output():
    f = torch.tensor([[1.0, 1.0, 0.0]])  # the argmax index is 0; class 1 ties it
    K = torch.ones(3, 3) - torch.eye(3)
    out = gloro_logits(f, K, 0.1)
    assert out[0, -1] > out[0, 0]  # bottom beats the predicted class: not certified
    assert out[0, -1].item() == pytest.approx(1.1)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="choose one of ce, cll, crc_lip, emma, gloro_ce, la, trades"):
        create_loss("hinge")


def test_logit_annealing_matches_its_definition():
    """Per sample: EMMA's adjusted logits, the offset off the label, CE at temperature T, weighted
    by (1 - p_t)^gamma and scaled by T; gamma 0, offset 0, T 1 is EMMA itself."""
    from certify_fx.losses import logit_annealing

    f, y, K = _batch(n=8, m=6, seed=4)
    eps, gamma, offset, t = 0.4, 3.0, 1.5, 0.6
    terms = []
    for n in range(len(y)):
        yn = int(y[n])
        z = _emma_shifted(f[n], yn, K, eps, low=0.01 * eps)
        z[yn] = z[yn] - offset
        ce = -(z[yn] / t - torch.logsumexp(z / t, 0))
        terms.append(t * (1 - torch.exp(-ce)) ** gamma * ce)
    loss = logit_annealing(f, y, K, eps, gamma=gamma, offset=offset, temperature=t)
    assert torch.allclose(loss, torch.stack(terms).mean())
    plain = logit_annealing(f, y, K, eps, gamma=0.0, offset=0.0, temperature=1.0, min_fraction=0.0)
    assert torch.allclose(plain, emma(f, y, K, eps))
    with pytest.raises(ValueError, match="temperature"):
        logit_annealing(f, y, K, eps, temperature=0.0)


def test_logit_annealing_anneals_what_is_already_certified_far():
    """A sample certified far past the boundary contributes (almost) nothing; one on it does."""
    from certify_fx.losses import logit_annealing

    K = torch.ones(3, 3, dtype=torch.float64) - torch.eye(3, dtype=torch.float64)
    far = torch.tensor([[30.0, 0.0, 0.0]], dtype=torch.float64)
    near = torch.tensor([[0.1, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    assert logit_annealing(far, y, K, 0.5).item() < 1e-12 < logit_annealing(near, y, K, 0.5).item()
