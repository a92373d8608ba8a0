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
