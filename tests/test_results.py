"""benchmarks/orderings.py, the script behind docs/results.md: it runs, certifies soundly and
rewrites only its own section of the results page."""

import subprocess
import sys

import pytest
import torch

import certify_fx
from conftest import ROOT, pgd_l2

SCRIPT = ROOT / "benchmarks" / "orderings.py"


@pytest.fixture(scope="module")
def orderings():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import orderings
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return orderings


def test_moons_study_writes_its_section_once_and_keeps_the_rest(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.md"
    results.write_text("# Results\n\nwritten by hand\n")
    command = [sys.executable, str(SCRIPT), "--study", "moons", "--moons-epochs", "3", "--write", "--results",
               str(results)]
    for _ in range(2):
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path)
    text = results.read_text()
    assert text.count("<!-- moons:begin") == 1 and text.count("<!-- moons:end -->") == 1
    assert "written by hand" in text and "| GloRo-CE |" in text and "| CLL |" in text
    assert (tmp_path / "results" / "moons.png").read_bytes()[:4] == b"\x89PNG"


def test_moons_network_certificates_hold_against_attacks(orderings):
    """The two-moons MLP trained briefly with CLL: PGD inside 0.999 x the certified radius never
    changes a prediction."""
    pytest.importorskip("sklearn")
    model, _ = orderings.train_moons("cll", epochs=5)
    x, y = orderings.two_moons(400, seed=2).tensors
    bound = certify_fx.bound(model, (2,), estimate_steps=0)
    cert = certify_fx.certify(model, x, orderings.MOONS_EPS, bound)
    assert cert.sound and (cert.pred == y).float().mean() > 0.8
    positive = cert.radius > 1e-3
    assert positive.sum() > 100
    found = pgd_l2(model, x[positive], cert.pred[positive], 0.999 * cert.radius[positive], steps=40, restarts=2,
                   seed=0)
    assert (found == cert.pred[positive]).all() and torch.isfinite(cert.radius).all()
