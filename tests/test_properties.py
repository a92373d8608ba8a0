"""Property-based soundness: random graphs from the whole accepted op vocabulary (tests/graphs.py).

* linear graphs: the bound dominates the exact margin norms of the materialised Jacobian;
* nonlinear graphs: the bound dominates a gradient-ascent + secant lower bound, and an l2 PGD
  attack inside each certified radius never flips a certified point;
* every registered rule is exercised by an accepted draw or by a model that must be refused;
  every refused model raises a CertifyFxError that names a node.

Fixed seeds in the fast suite; ``-m slow`` draws many more graphs.
"""

import copy
import random

import pytest
import torch

import certify_fx as cfx
from certify_fx.bounds import registry
from certify_fx.bounds.evaluation import Evaluator
from conftest import empirical_margin_lipschitz, exact_margin_norms, pgd_l2
from graphs import (BATCH_VALUES, REFUSALS, SHAPE, STATEFUL, VOCABULARY, CachedWeight, Drawn, batch_value_model,
                    container_variants, draw, instance_override, subclassed)

LINEAR = [o for o in VOCABULARY if o.linear]
NONLINEAR = [o for o in VOCABULARY if o.autograd]
PAIRS = [(0, 1), (3, 2), (4, 0)]


def affine_jacobian(model: torch.nn.Module) -> torch.Tensor:
    """The (m, n) Jacobian of an affine model from its values on basis vectors (float64, no autograd)."""
    model = copy.deepcopy(model).double()
    n = SHAPE[0] * SHAPE[1] * SHAPE[2]
    with torch.no_grad():
        basis = torch.cat([torch.zeros(1, n), torch.eye(n)]).double().view(-1, *SHAPE)
        out = model(basis)
    return (out[1:] - out[:1]).T


def check_linear(model: torch.nn.Module) -> None:
    b = cfx.bound(model, SHAPE, estimate_steps=0)
    assert b.sound and b.finite
    exact = exact_margin_norms(affine_jacobian(model))
    assert (b.margin >= exact * (1 - 1e-6) - 1e-9).all(), (b.margin - exact).min()


def check_nonlinear(model: torch.nn.Module, restarts: int = 2, steps: int = 30) -> None:
    b = cfx.bound(model, SHAPE, estimate_steps=0)
    assert b.sound and b.finite
    probe, dtype, slack = copy.deepcopy(model).double(), torch.float64, 1e-6
    try:
        probe(torch.rand(2, *SHAPE, dtype=torch.float64))
    except RuntimeError:  # a forward that keeps float32 tensors of its own (an instance-level override)
        probe, dtype, slack = model, torch.float32, 1e-4
    for i, j in PAIRS:
        lower = empirical_margin_lipschitz(probe, SHAPE, i, j, restarts=restarts, steps=steps, dtype=dtype)
        assert b.margin[i, j].item() >= lower * (1 - slack), (i, j, b.margin[i, j].item(), lower)
    x = torch.rand(64, *SHAPE) * 2 - 1
    cert = cfx.certify(model, x, 0.0, bound=b)
    certified = cert.radius > 0
    if certified.any():
        radius = cert.radius[certified].clamp(max=10.0).float().view(-1, 1, 1, 1)
        flipped = pgd_l2(model, x[certified], cert.pred[certified], 0.999 * radius) != cert.pred[certified]
        assert not flipped.any()


@pytest.mark.parametrize("index", range(len(LINEAR)))
def test_linear_graphs_bound_their_exact_jacobian(index):
    check_linear(draw(index, seed=0, linear_only=True))


@pytest.mark.parametrize("index", range(len(NONLINEAR)))
def test_random_graphs_are_sound(index):
    check_nonlinear(draw(index, seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 5))
def test_many_random_graphs_are_sound(seed):
    for index in range(len(LINEAR)):
        check_linear(draw(index, seed=seed, length=(2, 6), linear_only=True))
    for index in range(len(NONLINEAR)):
        check_nonlinear(draw(index, seed=seed, length=(2, 5)), restarts=2, steps=40)


@pytest.mark.parametrize("name,make,rule", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_what_cannot_be_bounded_is_refused_naming_the_node(name, make, rule):
    model = make().eval() if name not in ("dropout_module_training", "batch_norm_training") else make()
    with pytest.raises(cfx.CertifyFxError) as info:
        cfx.bound(model, SHAPE)
    assert "node '" in str(info.value)


def test_every_rule_is_drawn_or_refused(monkeypatch):
    applied: dict[str, set[str]] = {}
    current = [""]
    original = Evaluator.apply

    def spy(self, rule, *args, **kwargs):
        applied.setdefault(current[0], set()).add(rule.name)
        return original(self, rule, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "apply", spy)
    for op in VOCABULARY:
        current[0] = op.name
        for seed in range(40):  # every random form of the op
            cfx.bound(Drawn([op], seed).eval(), SHAPE, estimate_steps=0)
            if set(op.rules) <= applied.get(op.name, set()):
                break
        assert set(op.rules) <= applied.get(op.name, set()), (op.name, set(op.rules) - applied[op.name])
    for name, make, rule in REFUSALS:
        current[0] = name
        with pytest.raises(cfx.CertifyFxError):
            cfx.bound(make(), SHAPE)
        if rule is not None:
            assert rule in applied.get(name, set()), (name, rule)
    exercised = set().union(*applied.values())
    missing = {r.name for r in registry.all_rules()} - exercised
    assert not missing, f"rules without a draw in tests/graphs.py: {sorted(missing)}"


def sound_or_refused(model: torch.nn.Module) -> str:
    """Check ``model``'s bound (exact for linear models, gradient-ascent + PGD otherwise), or that
    it is refused with an error naming a node; returns "bounded" or "refused"."""
    try:
        cfx.bound(model, SHAPE, estimate_steps=0)
    except cfx.CertifyFxError as exc:
        assert "node '" in str(exc), str(exc)
        return "refused"
    check_nonlinear(model, restarts=1, steps=20)
    return "bounded"


@pytest.mark.parametrize("index", range(len(NONLINEAR)))
def test_subclasses_of_leaf_types_are_sound_or_refused(index):
    """A rule covers its exact type: a subclass overriding forward, _conv_forward, theta, expand,
    ... is traced into (and bounded by what it computes) or refused."""
    r = random.Random(index)
    for seed in range(3):
        drawn = draw(index, seed=seed)
        for model in (subclassed(drawn, r), instance_override(drawn)):
            if model is not None:
                sound_or_refused(model.eval())


@pytest.mark.parametrize("name,make", container_variants(), ids=[c[0] for c in container_variants()])
def test_container_leaves_with_each_conv_variant(name, make):
    outcome = sound_or_refused(make().eval())
    if name.endswith("_plain") or name == "linear_bottleneck_pointwise":
        assert outcome == "bounded"


@pytest.mark.parametrize("name,fn,refused", BATCH_VALUES, ids=[b[0] for b in BATCH_VALUES])
def test_values_from_the_batch_size(name, fn, refused):
    model = batch_value_model(fn)
    if refused:
        with pytest.raises(cfx.CertifyFxError, match="batch") as info:
            cfx.bound(model, SHAPE, estimate_steps=0)
        assert "node '" in str(info.value)
    else:
        check_nonlinear(model, restarts=1, steps=10)


@pytest.mark.parametrize("name,make,attribute", STATEFUL, ids=[s[0] for s in STATEFUL])
def test_stateful_forwards_are_refused_naming_the_attribute(name, make, attribute):
    model = make().eval()
    before = copy.deepcopy(model.state_dict()), copy.deepcopy({k: v for k, v in vars(model.body).items()
                                                                  if not k.startswith("_")})
    with pytest.raises(cfx.CertifyFxError) as info:
        cfx.bound(model, SHAPE, estimate_steps=0)
    if attribute is not None:
        assert f"'{attribute}'" in str(info.value)
    after = model.state_dict(), {k: v for k, v in vars(model.body).items() if not k.startswith("_")}
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), "bounding changed a buffer"
    assert repr(before[1]) == repr(after[1]), "bounding changed an attribute"


def test_a_forward_that_caches_is_bounded_and_left_as_it_was():
    model = torch.nn.Sequential(CachedWeight(), torch.nn.Flatten(), torch.nn.Linear(64, 5)).eval()
    b = cfx.bound(model, SHAPE, estimate_steps=0)
    assert model[0].cache is None  # tracing wrote a Proxy there; it is put back
    assert b.sound
    for i, j in PAIRS:  # a fresh copy per pair: its first forward fills its own cache, in float64
        lower = empirical_margin_lipschitz(copy.deepcopy(model).double(), SHAPE, i, j, restarts=1, steps=20)
        assert b.margin[i, j].item() >= lower * (1 - 1e-6)
    with torch.no_grad():
        assert isinstance(model(torch.rand(2, *SHAPE)), torch.Tensor)
