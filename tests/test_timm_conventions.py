"""timm's conventions: its standard data pipeline feeds certify-fx models exactly the [0, 1] pixels
their certificates are stated in, and zoo and converted models have timm's classifier API."""

import copy
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import certify_fx as cfx
from certify_fx.data.fashion_mnist import DEFAULT_FASHION_MNIST_ROOT
from certify_fx.train import build_split, load_recipe

ROOT_RECIPE = "recipes/fashion_mnist.yaml"


def _zoo():
    torch.manual_seed(0)
    return timm.create_model("liresnet_l6w32", num_classes=10, in_chans=1, img_size=28).eval()


def _converted():
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=10, in_chans=1)
    return cfx.convert(source, to="liresnet", input_shape=(1, 28, 28)).eval()


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(), reason="Fashion-MNIST not installed (make data)")
@pytest.mark.parametrize("make_model", [_zoo, _converted], ids=["zoo", "converted"])
def test_radius_from_timms_pipeline_equals_radius_from_the_recipes(make_model):
    model = make_model()
    recipe = load_recipe(ROOT_RECIPE, ["data.eval_subset=64"])
    test_set = build_split(recipe, "test")
    from_recipe = torch.stack([test_set[i][0] for i in range(64)])

    config = resolve_data_config({}, model=model)
    assert config["mean"] == (0.0,) and config["std"] == (1.0,) and config["input_size"] == (1, 28, 28)
    transform = create_transform(**config)  # timm's eval pipeline: resize, centre crop, to tensor, normalise
    images = getattr(test_set, "dataset", test_set).images  # the uint8 images, as a user's PIL files hold them
    pixels = images[:64, 0].numpy()
    from_timm = torch.stack([transform(Image.fromarray(p, mode="L")) for p in pixels])

    assert torch.equal(from_timm, from_recipe)
    bound = cfx.bound(model, (1, 28, 28), estimate_steps=0)
    a = cfx.certify(model, from_timm, eps=0.1, bound=bound)
    b = cfx.certify(model, from_recipe, eps=0.1, bound=bound)
    assert torch.equal(a.radius, b.radius) and torch.equal(a.pred, b.pred) and a.radius.max() > 0


@pytest.mark.parametrize("make_model", [_zoo, _converted], ids=["zoo", "converted"])
def test_classifier_api_matches_timm(make_model):
    model = make_model()
    x = torch.rand(3, 1, 28, 28)
    assert model.num_classes == 10 and model.pretrained_cfg["num_classes"] == 10
    features = model.forward_features(x)
    assert torch.equal(model.forward_head(features), model(x))
    assert torch.equal(model.forward_head(features, pre_logits=True), features)
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == 10

    model.reset_classifier(4)
    assert model(x).shape == (3, 4) and model.num_classes == 4 and type(model.get_classifier()) is type(head)
    assert cfx.bound(model, (1, 28, 28), estimate_steps=0).margin.shape == (4, 4)  # re-traced, still sound
    model.reset_classifier(0)
    assert model(x).shape == features.shape


def test_a_deep_copied_converted_model_keeps_its_api():
    model = _converted()
    clone = copy.deepcopy(model)
    x = torch.rand(2, 1, 28, 28)
    assert isinstance(clone, cfx.transforms.ConvertedModel) and clone.num_classes == 10 and clone.conversion == model.conversion
    assert torch.equal(clone(x), model(x)) and torch.equal(clone.forward_features(x), model.forward_features(x))
