"""Every package folder ships; the public API is what __all__ says."""

import tomllib
from pathlib import Path

import certify_fx

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "certify_fx").rglob("__init__.py")}
    found.add("certify_fx_cli")
    assert found <= listed, found - listed


def test_public_api():
    for name in certify_fx.__all__:
        assert hasattr(certify_fx, name), name
    assert callable(certify_fx.bound) and callable(certify_fx.certify)


def test_dependencies_are_ranges_and_an_installed_torch_is_kept(tmp_path):
    import json
    import re
    import subprocess
    import sys

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert "==" not in requirement and "<" not in requirement, requirement  # ranges, no exact pins or caps
    assert not re.search(r"<\s*3\.12", project["requires-python"])
    # what `pip install .` would change in this environment (which has a supported torch): only certify-fx
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                    "--no-build-isolation", str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    installs = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    assert installs == {"certify-fx"}, installs
