"""Save and load converted models without running code from the file.

A converted model is a GraphModule whose Python code is generated; pickling it would mean running
that code on load. Instead the file holds only tensors and plain data (loaded with
``torch.load(..., weights_only=True)``): the converted weights and a *spec* — where the source
model comes from and the conversion options. Loading rebuilds the source model, re-runs the
(deterministic) conversion and loads the weights strictly.

Only timm model names (and certify-fx's own registered models) are rebuilt by default; a spec that
names a Python module is imported only with ``trust_source=True``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..errors import CertifyFxError
from ..files import atomic_torch_save

__all__ = ["save_converted", "load_converted", "build_source", "FORMAT"]

FORMAT = "certify-fx/converted"
VERSION = 1


def build_source(source: dict[str, Any], trust_source: bool = False) -> torch.nn.Module:
    """The unconverted model a spec names: ``{"kind": "timm", "name": ..., "kwargs": {...}}``
    or ``{"kind": "module", "spec": "pkg.mod:attr", "kwargs": {...}}``."""
    kwargs = dict(source.get("kwargs") or {})
    if source.get("kind") == "timm":
        import timm

        import certify_fx.models  # noqa: F401  (registers certify-fx models with timm)

        name = source["name"]
        if not timm.is_model(name):
            raise CertifyFxError(f"the file names timm model {name!r}, which this timm does not have")
        return timm.create_model(name, pretrained=False, **kwargs)
    if source.get("kind") == "module":
        if not trust_source:
            raise CertifyFxError(
                f"the file was converted from Python code ({source.get('spec')!r}); loading it imports that code. "
                "Pass trust_source=True (CLI: --trust-source) if you trust it")
        module_name, attr = source["spec"].rsplit(":", 1)
        obj = getattr(importlib.import_module(module_name), attr)
        return obj if isinstance(obj, torch.nn.Module) else obj(**kwargs)
    raise CertifyFxError(f"unknown model source {source!r}")


def save_converted(gm: fx.GraphModule, path: str | Path, source: dict[str, Any]) -> None:
    """Save a model returned by :func:`certify_fx.convert` (atomically).

    Args:
        source: how to rebuild the unconverted model, e.g. ``{"kind": "timm", "name": "resnet50",
            "kwargs": {"num_classes": 10}}``.
    """
    conversion = getattr(gm, "conversion", None)
    if conversion is None:
        raise CertifyFxError("save_converted expects a model returned by certify_fx.convert")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "conversion": conversion,
        "rewrite_log": [r.to_dict() for r in getattr(gm, "rewrite_log", [])],
        "state_dict": {k: v.detach().cpu() for k, v in gm.state_dict().items()},
    }
    atomic_torch_save(payload, path)


def load_converted(path: str | Path, trust_source: bool = False) -> fx.GraphModule:
    """Rebuild a converted model saved by :func:`save_converted` (no code from the file runs)."""
    from .convert import convert

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CertifyFxError(f"no such file: {path}") from None
    except Exception as exc:
        raise CertifyFxError(f"{path} is not a readable certify-fx file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CertifyFxError(f"{path} is not a converted certify-fx model (no {FORMAT!r} header)")
    if payload.get("version") != VERSION:
        raise CertifyFxError(f"{path} has format version {payload.get('version')}, this certify-fx reads {VERSION}")
    conversion = payload["conversion"]
    model = build_source(payload["source"], trust_source)
    gm = convert(model, to=conversion["to"], input_shape=conversion["input_shape"],
                 activation=conversion["activation"], max_pool=conversion["max_pool"], check=False)
    missing, unexpected = gm.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise CertifyFxError(f"{path} does not match the rebuilt model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); was it saved by another certify-fx or timm version?")
    gm.source = payload["source"]
    return gm
