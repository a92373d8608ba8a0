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

from pathlib import Path
from typing import Any

import torch.fx as fx

from ..errors import CertifyFxError
from ..model_spec import ModelSpec
from ..weights import CONVERTED_FORMAT, read_payload, save_payload

__all__ = ["save_converted", "load_converted", "rebuild_converted", "FORMAT"]

FORMAT = CONVERTED_FORMAT
VERSION = 1


def save_converted(gm: fx.GraphModule, path: str | Path, source: ModelSpec | dict[str, Any]) -> None:
    """Save a model returned by :func:`certify_fx.convert` (atomically).

    Args:
        source: how to rebuild the unconverted model: a :class:`~certify_fx.ModelSpec`
            (``ModelSpec.parse("resnet50", {"num_classes": 10})``) or its ``to_dict()``.
    """
    conversion = getattr(gm, "conversion", None)
    if conversion is None:
        raise CertifyFxError("save_converted expects a model returned by certify_fx.convert")
    spec = source if isinstance(source, ModelSpec) else ModelSpec.from_dict(source)
    records = {
        "format": FORMAT,
        "version": VERSION,
        "source": spec.to_dict(),
        "conversion": conversion,
        "rewrite_log": [r.to_dict() for r in getattr(gm, "rewrite_log", [])],
    }
    save_payload(gm.state_dict(), path, records)


def rebuild_converted(spec: ModelSpec, conversion: dict[str, Any], trust_source: bool = False) -> fx.GraphModule:
    """The converted model's structure, rebuilt from its source spec and conversion options
    (the weights are those of a fresh source model until a state_dict is loaded)."""
    from .convert import convert_structure

    options = {k: v for k, v in conversion.items() if k not in ("to", "input_shape")}
    return convert_structure(spec.build(trust_source), conversion["to"], conversion["input_shape"], **options)


def load_converted(path: str | Path, trust_source: bool = False) -> fx.GraphModule:
    """Rebuild a converted model saved by :func:`save_converted` (no code from the file runs;
    a model converted from Python code is rebuilt only with ``trust_source=True``)."""
    payload = read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CertifyFxError(f"{path} is not a converted certify-fx model (no {FORMAT!r} header)")
    if payload.get("version") != VERSION:
        raise CertifyFxError(f"{path} has format version {payload.get('version')}, this certify-fx reads {VERSION}")
    gm = rebuild_converted(ModelSpec.from_dict(payload["source"]), payload["conversion"], trust_source)
    missing, unexpected = gm.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise CertifyFxError(f"{path} does not match the rebuilt model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); was it saved by another certify-fx or timm version?")
    return gm
