"""certify-fx audit: no attack succeeds inside a certified radius, the certification gap, K tightness."""

import dataclasses
import json

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import certify_fx
from certify_fx.audit import attack, audit
from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small LiResNet trained briefly on real Fashion-MNIST (the fashion_mnist recipe, shortened)."""
    from certify_fx.train import Trainer, load_recipe

    out = tmp_path_factory.mktemp("fm")
    recipe = load_recipe(ROOT / "recipes" / "fashion_mnist.yaml", [
        f"output_dir={out}", "epochs=1", "data.train_subset=4096", "data.eval_subset=200", "data.batch_size=128",
        "model.name=liresnet_l4w32", "model.kwargs={neck_dim: 128}", "optim.warmup_epochs=0.1",
        "bound.converge_steps=0"])
    trainer = Trainer(recipe)
    trainer.fit()
    return out / "checkpoint.pt", trainer.model.eval(), trainer.test_set


def _batches(test_set, n=200):
    return DataLoader(Subset(test_set, range(n)), batch_size=100)


def test_audit_of_a_trained_model_finds_no_violation_and_a_consistent_gap(trained):
    _, model, test_set = trained
    report = audit(model, _batches(test_set, 100), [0.1, 0.3], steps=20)
    assert report.sound and report.violations == []
    assert report.vra[0.1] > 0.3  # trained, so the check is not vacuous
    for e in (0.1, 0.3):
        assert report.empirical_robust_accuracy[e] >= report.vra[e]
        assert report.empirical_robust_accuracy[e] <= report.clean_accuracy
    assert report.empirical_robust_accuracy[0.3] < report.clean_accuracy  # the attacks do find something
    assert report.k_tightness and all(t.ratio >= 1 for t in report.k_tightness)
    assert {"violations", "vra", "empirical_robust_accuracy", "k_tightness"} <= set(report.to_dict())


# After one short epoch the proven radii are ~15x below the distance to the boundary along the
# gradient (measured), so K scaled down 10x still certifies most points truly; 100x does not.
TAMPER = 100


def test_audit_catches_a_bound_scaled_down(trained):
    _, model, test_set = trained
    bound = certify_fx.bound(model, (1, 28, 28), estimate_steps=0)
    false = dataclasses.replace(bound, margin=bound.margin / TAMPER)  # same model, radii far too large
    report = audit(model, _batches(test_set, 100), [0.1], false, steps=10, restarts=0)
    assert not report.sound and len(report.violations) > 20
    v = report.violations[0]
    assert v.distance <= 0.999 * v.radius + 1e-6 and v.became != v.predicted


def test_attack_reports_where_the_class_changed():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model[1].bias.zero_()
    x = torch.tensor([[[0.5, 0.0]]])  # margin 1.0, boundary at distance 0.5 along -x
    pred = torch.tensor([0])
    flipped, distance, became = attack(model, x, pred, 0.6)
    assert flipped.item() and 0.5 <= distance.item() <= 0.6 and became.item() == 1
    assert not attack(model, x, pred, 0.49)[0].item()


def test_the_audit_command_prints_json_and_exits_nonzero_on_false_certificates(trained, monkeypatch, capsys):
    checkpoint, _, _ = trained
    done = run_cli("audit", checkpoint, "--limit", "100", "--eps", "0.1", "--steps", "10", "--restarts", "0", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["violations"] == [] and set(summary["vra"]) == {"0.1"}
    assert summary["empirical_robust_accuracy"]["0.1"] >= summary["vra"]["0.1"]

    from certify_fx_cli.main import main

    honest = certify_fx.certificate_bound

    def too_small(*args, **kwargs):
        bound = honest(*args, **kwargs)
        return dataclasses.replace(bound, margin=bound.margin / TAMPER)

    monkeypatch.setattr(certify_fx, "certificate_bound", too_small)
    assert main(["audit", str(checkpoint), "--limit", "100", "--eps", "0.1", "--steps", "10", "--restarts", "0"]) == 1
    assert "violation" in capsys.readouterr().out


def test_certify_the_trainer_and_the_audit_report_one_vra(trained):
    """The three consumers of a certificate share one loop over the data: on the same checkpoint
    and test set, `certify --json`, the trainer's last evaluation and `audit` agree to the bit."""
    checkpoint, _, test_set = trained
    history = [json.loads(line) for line in (checkpoint.parent / "log.jsonl").read_text().splitlines()]
    trainer_vra = history[-1]["vra"]
    radii = ",".join(trainer_vra)
    certified = run_cli("certify", checkpoint, "--eps", radii, "--json")
    assert certified.returncode == 0, certified.stderr[-2000:]
    audited = run_cli("audit", checkpoint, "--eps", radii, "--limit", str(len(test_set)), "--steps", "2",
                      "--restarts", "0", "--json")  # the audit's default is 1000 images, the recipe's 200
    assert audited.returncode == 0, audited.stderr[-2000:]
    certify_report, audit_report = json.loads(certified.stdout), json.loads(audited.stdout)
    assert certify_report["count"] == audit_report["count"] == len(test_set)
    assert certify_report["vra"] == audit_report["vra"] == trainer_vra
    assert certify_report["clean_accuracy"] == audit_report["clean_accuracy"] == history[-1]["clean_accuracy"]
    assert max(trainer_vra.values()) > 0.3  # a trained model: the comparison is not of zeros


def test_top_k_audit_finds_no_violation_and_catches_a_bound_scaled_down(trained):
    _, model, test_set = trained
    report = audit(model, _batches(test_set, 100), [0.1, 0.3], steps=10, restarts=0, top_k=3)
    top1 = audit(model, _batches(test_set, 100), [0.1, 0.3], steps=2, restarts=0)
    assert report.sound and report.violations == []
    assert report.clean_accuracy >= top1.clean_accuracy and report.clean_accuracy > 0.9  # top-3 accuracy
    assert report.vra[0.3] > top1.vra[0.3]  # a weaker claim certifies more
    assert all(report.empirical_robust_accuracy[e] >= report.vra[e] for e in (0.1, 0.3))
    bound = certify_fx.bound(model, (1, 28, 28), estimate_steps=0)
    false = dataclasses.replace(bound, margin=bound.margin / TAMPER)
    tampered = audit(model, _batches(test_set, 100), [0.1], false, steps=10, restarts=0, top_k=3)
    assert len(tampered.violations) > 10
    v = tampered.violations[0]
    assert v.distance <= 0.999 * v.radius + 1e-6 and v.became != v.predicted


def test_a_method_object_that_certifies_another_k_is_refused():
    from certify_fx.certificates import LipschitzMethod
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    data = [(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]))]
    with pytest.raises(certify_fx.CertifyFxError, match="top_k=2"):
        audit(model, data, 0.1, method=LipschitzMethod(), top_k=2)
