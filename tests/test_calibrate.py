"""Conversion that keeps what the source learned: calibration, and distillation while certifying."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import certify_fx as cfx
from certify_fx.data.synthetic import SyntheticImages
from certify_fx.errors import RecipeError
from certify_fx.losses import distillation
from certify_fx.train import Trainer, load_recipe, recipe_from_dict

from conftest import ROOT

TINY = {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "stem_width": 8, "in_chans": 1, "num_classes": 4}
SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def trained():
    """A tiny timm resnet18 trained with cross-entropy on synthetic images, and those images."""
    torch.manual_seed(0)
    data = SyntheticImages(num_classes=4, in_chans=1, img_size=16, size=512, split="train", noise=0.5, seed=0)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    model = timm.create_model("resnet18", **TINY)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(60):
        i = torch.randint(len(x), (64,))
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), x, y


def test_calibration_brings_a_converted_model_back_to_its_source(trained):
    model, x, y = trained
    before_state = copy.deepcopy(model.state_dict())
    source_accuracy = (model(x).argmax(1) == y).float().mean().item()
    plain = cfx.convert(model, "liresnet", input_shape=SHAPE, rescale=False)
    calibrated = cfx.convert(model, "liresnet", input_shape=SHAPE, rescale=False)
    result = cfx.transforms.calibrate(calibrated, model, x[:256])

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())  # source untouched
    assert {f.source_node for f in result.fits} >= {"add", "fc"}  # a block and the classifier
    assert all(f.error_after < f.error_before for f in result.fits)
    assert result.agreement_before < 0.6 < 0.85 < result.agreement_after
    log = [r for r in calibrated.rewrite_log if r.pass_name == "calibrate"]
    assert len(log) == len(result.fits) + 1 and all(r.changes_function for r in log)
    with torch.no_grad():
        accuracy = {name: (m(x).argmax(1) == y).float().mean().item()
                    for name, m in (("plain", plain), ("calibrated", calibrated))}
    assert accuracy["plain"] < 0.6 and accuracy["calibrated"] > source_accuracy - 0.1

    bound = cfx.bound(calibrated, SHAPE, estimate_steps=50)
    assert bound.sound and torch.isfinite(bound.margin).all()
    assert (bound.estimate.nan_to_num(0) <= bound.margin * (1 + 1e-6)).all()


def test_convert_calibrates_before_rescaling_and_keeps_the_predictions(trained):
    model, x, _ = trained
    unscaled = cfx.convert(model, "liresnet", input_shape=SHAPE, rescale=False)
    cfx.transforms.calibrate(unscaled, model, x[:256])
    scaled = cfx.convert(model, "liresnet", input_shape=SHAPE, calibration_data=x[:256])
    with torch.no_grad():
        assert torch.equal(scaled(x).argmax(1), unscaled(x).argmax(1))
    passes = [r.pass_name for r in scaled.rewrite_log]
    assert passes.index("calibrate") < passes.index("rescale_layers")


def test_calibration_needs_images(trained):
    model, _, _ = trained
    converted = cfx.convert(model, "liresnet", input_shape=SHAPE)
    with pytest.raises(cfx.CertifyFxError, match="non-empty batch"):
        cfx.transforms.calibrate(converted, model, torch.empty(0, *SHAPE))


def test_distillation_is_the_tempered_kl_divergence():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    t = 3.0
    p = (teacher / t).softmax(1)
    expected = (p * (p.log() - (student / t).log_softmax(1))).sum(1).mean() * t * t
    torch.testing.assert_close(distillation(student, teacher, t), expected)
    distillation(student, teacher, t).backward()
    assert student.grad is not None and distillation(teacher, teacher, t).abs() < 1e-6


def test_recipe_distill_and_calibration_keys_are_checked():
    raw = yaml.safe_load((ROOT / "recipes" / "smoke_convert.yaml").read_text())
    for key, value, message in [("distill", {"temperature": 0}, "distill.temperature"),
                                ("distill", {"wieght": 1.0}, "distill.wieght"),
                                ("model", {**raw["model"], "calibration": -1}, "model.calibration")]:
        with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
            recipe_from_dict({**raw, key: value})
    recipe = recipe_from_dict(raw)
    assert recipe.distill.teacher_weights(recipe.model) is None  # no source weights: nothing to distil
    recipe.model.checkpoint = "source.pt"
    assert recipe.distill.teacher_weights(recipe.model) == "source.pt"
    recipe.distill.teacher = "none"
    assert recipe.distill.teacher_weights(recipe.model) is None


def test_a_converting_recipe_with_source_weights_calibrates_and_distils(trained, tmp_path):
    model, _, _ = trained
    torch.save(model.state_dict(), tmp_path / "source.pt")
    recipe = load_recipe(ROOT / "recipes" / "smoke_convert.yaml",
                         [f"model.checkpoint={tmp_path / 'source.pt'}", "epochs=1", f"output_dir={tmp_path / 'run'}",
                          "model.calibration=128"])
    trainer = Trainer(recipe)
    try:
        assert trainer.teacher is not None and not trainer.teacher.training
        teacher_state = copy.deepcopy(trainer.teacher.state_dict())
        assert any(r.pass_name == "calibrate" for r in trainer.model.rewrite_log)
        assert trainer.evaluate()["clean_accuracy"] > 0.8  # the source's accuracy, before any training
        history = trainer.fit()
    finally:
        trainer.close()
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert history[-1]["loss"] > 0 and history[-1]["sound"]


def test_a_converted_vit_is_calibrated_block_by_block():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, depth=2,
                              num_classes=4, embed_dim=32, num_heads=2).eval()
    x = torch.rand(64, *SHAPE)
    converted = cfx.convert(model, "lipschitz-vit", input_shape=SHAPE, rescale=False)
    result = cfx.transforms.calibrate(converted, model, x)
    assert {f.source_node for f in result.fits} >= {"add_2", "add_4", "head"}  # both blocks and the head
    assert all(f.error_after < f.error_before for f in result.fits)
    assert result.agreement_after > result.agreement_before
