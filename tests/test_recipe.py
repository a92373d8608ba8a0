"""Recipe schema: every key checked, dotted overrides, schedules."""

from pathlib import Path

import pytest

from certify_fx.errors import RecipeError
from certify_fx.train import Recipe, apply_overrides, eps_schedule, linear_ramp, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_the_shipped_recipes():
    names = {p.stem for p in RECIPES}
    assert {"cifar10", "cifar100", "tinyimagenet", "imagenet", "fashion_mnist", "smoke"} <= names
    import timm
    import certify_fx.models  # noqa: F401  (the certify-fx families)
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.epochs >= 1 and recipe.eval_eps
        assert ":" in recipe.model.name or timm.is_model(recipe.model.name), (path.name, recipe.model.name)
    imagenet = load_recipe(RECIPES[[p.stem for p in RECIPES].index("imagenet")])
    assert (imagenet.model.name, imagenet.data.batch_size, imagenet.epochs) == ("liresnet_l12w588", 1024, 400)
    assert imagenet.model.kwargs["neck_dim"] == 4096


def test_unknown_keys_name_the_key_and_the_allowed_ones():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'data.bach_size' in section 'data' \(did you mean 'batch_size'\?\); allowed: name, root"):
        recipe_from_dict({"data": {"bach_size": 3}})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'epoch' at the top level \(did you mean 'epochs'\?\); allowed: seed, epochs"):
        recipe_from_dict({"epoch": 3})


def test_types_and_values_are_checked():
    with pytest.raises(RecipeError, match="'epochs' must be int, got 'ten'"):
        recipe_from_dict({"epochs": "ten"})
    with pytest.raises(RecipeError, match="'data' must be a mapping"):
        recipe_from_dict({"data": [1, 2]})
    with pytest.raises(RecipeError, match="'loss.name' has unknown value 'hinge'; allowed: ce, gloro_ce"):
        recipe_from_dict({"loss": {"name": "hinge"}})
    with pytest.raises(RecipeError, match="'data.augment' has unknown value 'mixup'"):
        recipe_from_dict({"data": {"augment": ["mixup"]}})
    with pytest.raises(RecipeError, match="'data.batch_size' must be >= 1"):
        recipe_from_dict({"data": {"batch_size": 0}})
    r = recipe_from_dict({"optim": {"lr": 1, "warmup_epochs": "2e-1"}, "eps": {"evaluate": 0.3}})
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float) and r.optim.warmup_epochs == 0.2
    assert r.eval_eps == [0.3]


def test_dotted_overrides():
    raw = apply_overrides({"data": {"name": "synthetic"}},
                          ["data.batch_size=128", "model.kwargs.neck_dim=64", "data.augment=[crop, flip]",
                           "output_dir=/tmp/x", "data.root=null"])
    r = recipe_from_dict(raw)
    assert (r.data.batch_size, r.model.kwargs, r.data.augment, r.output_dir) == (128, {"neck_dim": 64}, ["crop", "flip"], "/tmp/x")
    assert r.data.root is None and r.data.name == "synthetic"
    with pytest.raises(RecipeError, match="not key=value"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(RecipeError, match="unknown recipe key 'optim.learning_rate'"):
        recipe_from_dict(apply_overrides({}, ["optim.learning_rate=0.1"]))


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("epochs: [3\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line 2") as err:
        load_recipe(bad)
    assert "\n" not in str(err.value)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")  # safe_load refuses tags
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_recipe_round_trips_through_a_dict():
    r = load_recipe(RECIPES[0])
    assert recipe_from_dict(r.to_dict()) == r
    assert Recipe() == recipe_from_dict({})


def test_liresnet_eps_schedule_is_the_papers_formula():
    eps, T = 36 / 255, 800
    for t in (0, 100, 200, 399, 400, 600, 800):
        expected = (min(2 * t / T, 1) * 1.9 + 0.1) * eps
        assert eps_schedule("liresnet", eps, t, T) == pytest.approx(expected)


def test_other_schedules():
    assert eps_schedule("fixed", 0.5, 0, 10, train_multiplier=1.0) == 0.5
    assert eps_schedule("linear", 1.0, 0, 10, start=0.0, train_multiplier=3.0, ramp_fraction=0.5) == 0.0
    assert eps_schedule("linear", 1.0, 10, 10, start=0.0, train_multiplier=3.0) == 3.0
    values = [eps_schedule("log", 1.0, t, 10, start=0.0, train_multiplier=1.0) for t in range(11)]
    assert values[0] == 0 and values[5] == pytest.approx(1.0) and all(a <= b for a, b in zip(values, values[1:]))
    assert values[1] > 0.2  # logarithmic: fast at first
    assert linear_ramp(0, 2, 1, 4) == 0.5 and linear_ramp(0, 2, 9, 4) == 2
    with pytest.raises(ValueError, match="unknown eps schedule"):
        eps_schedule("cubic", 1.0, 0, 1)
