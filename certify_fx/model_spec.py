"""Where a model comes from: a timm name, ``package.module:attr`` or ``path/to/file.py:attr``.

One :class:`ModelSpec` type parses what a user writes (command line, recipe ``model.name``), builds
the model, and is recorded in every file certify-fx writes (converted models, checkpoints) so that
the model can be rebuilt later, from another directory, without pickled code.

Building from Python code (a module or a file) imports and runs that code, so it needs
``trust_source=True``: a spec typed by the user is trusted by the CLI, a spec read from a file is
not unless the user says so (``--trust-source``).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
from timm.models import _builder
from torch import nn

from .errors import CertifyFxError

__all__ = ["ModelSpec", "SpecKind", "closest_model_names"]

SpecKind = Literal["timm", "module", "file"]


def closest_model_names(name: str, limit: int = 5) -> list[str]:
    """timm model names (certify-fx families included) closest to ``name``, for error messages."""

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.6)
    return close or [n for n in names if name.lower().replace("_", "") in n.replace("_", "")][:limit]


@dataclass(frozen=True)
class ModelSpec:
    """A buildable model source.

    Attributes:
        kind: ``"timm"`` (a registered timm name, certify-fx families included), ``"module"``
            (an importable ``package.module`` and an attribute) or ``"file"`` (a ``.py`` file and an
            attribute; the absolute path is recorded).
        target: the timm name, the module path, or the file path.
        attr: the attribute (a class, a factory function or an ``nn.Module`` instance); ``None``
            for timm names.
        kwargs: keyword arguments for the timm entrypoint or the callable.
    """

    kind: SpecKind
    target: str
    attr: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, kwargs: dict[str, Any] | None = None) -> ModelSpec:
        """Parse ``resnet18``, ``torchvision.models:resnet18`` or ``./net.py:Net``.

        Raises:
            CertifyFxError: a missing file, an unknown timm name (with the closest names).
        """
        kwargs = dict(kwargs or {})
        text = str(text).strip()
        if ":" in text:
            target, attr = text.rsplit(":", 1)
            if not target or not attr.isidentifier():
                raise CertifyFxError(f"model spec {text!r}: expected 'module:attribute' or 'file.py:attribute'")
            if target.endswith(".py"):
                path = Path(target).expanduser()
                if not path.is_file():
                    raise CertifyFxError(f"model spec {text!r}: no such file: {path}")
                return cls("file", str(path.resolve()), attr, kwargs)
            return cls("module", target, attr, kwargs)

        if not timm.is_model(text):
            close = closest_model_names(text)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CertifyFxError(f"unknown model {text!r}: not a timm model name (certify-fx families included) "
                                 f"nor 'module:attribute' / 'file.py:attribute'{hint}")
        return cls("timm", text, None, kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Read a recorded spec (also the ``{"kind": "timm", "name": ...}`` / ``{"spec": "m:a"}``
        forms written by certify-fx 0.1)."""
        kind, kwargs = data.get("kind"), dict(data.get("kwargs") or {})
        if kind == "timm":
            return cls("timm", data.get("target") or data["name"], None, kwargs)
        if kind == "module" and "spec" in data:
            target, attr = data["spec"].rsplit(":", 1)
            return cls("module", target, attr, kwargs)
        if kind in ("module", "file"):
            return cls(kind, data["target"], data["attr"], kwargs)
        raise CertifyFxError(f"unknown model source {data!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "attr": self.attr, "kwargs": dict(self.kwargs)}

    def with_kwargs(self, **kwargs: Any) -> ModelSpec:
        """This spec with more keyword arguments (given ones override recorded ones)."""
        return ModelSpec(self.kind, self.target, self.attr, {**self.kwargs, **kwargs})

    @property
    def is_certify_fx_family(self) -> bool:
        """A timm name registered by certify-fx (those take ``img_size``, ``mean`` and ``std``)."""
        if self.kind != "timm":
            return False

        return timm.models.model_entrypoint(self.target).__module__.startswith("certify_fx")

    def __str__(self) -> str:
        return self.target if self.kind == "timm" else f"{self.target}:{self.attr}"

    def build(self, trust_source: bool = False) -> nn.Module:
        """Build the model (timm models with ``pretrained=False``: nothing is downloaded).

        Raises:
            CertifyFxError: code specs without ``trust_source``, import failures, a missing
                attribute, kwargs that do not fit, or something that is not an ``nn.Module``.
        """
        if self.kind == "timm":

            if not timm.is_model(self.target):
                raise CertifyFxError(f"this timm has no model {self.target!r}")
            _check_timm_kwargs(self.target, self.kwargs)
            try:
                return timm.create_model(self.target, pretrained=False, **self.kwargs)
            except TypeError as exc:
                raise CertifyFxError(f"model {self.target}: keyword arguments {sorted(self.kwargs)} do not fit "
                                     f"({exc})") from None
        if not trust_source:
            raise CertifyFxError(f"the model is built by Python code ({self}); building it imports and runs that "
                                 "code. Pass trust_source=True (CLI: --trust-source) if you trust it")
        obj = getattr(self._import(), self.attr, None)
        if obj is None:
            raise CertifyFxError(f"model spec {self}: {self.target!r} has no attribute {self.attr!r}")
        if isinstance(obj, nn.Module):
            if self.kwargs:
                raise CertifyFxError(f"model spec {self}: {self.attr} is a module instance; it takes no kwargs")
            return obj
        try:
            model = obj(**self.kwargs)
        except TypeError as exc:
            raise CertifyFxError(f"model spec {self}: calling {self.attr}(**{self.kwargs}) failed: {exc}") from None
        if not isinstance(model, nn.Module):
            raise CertifyFxError(f"model spec {self} did not give an nn.Module (got {type(model).__name__})")
        return model

    def _import(self) -> Any:
        if self.kind == "module":
            try:
                return importlib.import_module(self.target)
            except ImportError as exc:
                raise CertifyFxError(f"model spec {self}: cannot import {self.target!r}: {exc}") from None
        path = Path(self.target)
        if not path.is_file():
            raise CertifyFxError(f"model spec {self}: the file {path} no longer exists")
        # A stable, unique module name per file, so that two files called net.py do not collide
        # and classes defined in the file can be found again (pickling, torch.fx code generation).
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        name = f"certify_fx_user_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise CertifyFxError(f"model spec {self}: running {path} failed: {type(exc).__name__}: {exc}") from None
        return module


def _timm_loading_options() -> frozenset[str]:
    """The keyword arguments timm's builders consume themselves (weights to load, files to read,
    configs to merge) rather than pass to the architecture, from timm's own signatures."""

    names = set()
    for fn, own in ((timm.create_model, {"model_name"}), (_builder.build_model_with_cfg, {"model_cls", "variant"})):
        names |= {p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD} - own
    return frozenset(names)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _check_timm_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """A spec's kwargs describe the architecture only: timm's loading options (``pretrained``,
    ``checkpoint_path``, ``pretrained_cfg``: they read or download files) and values that are not
    plain numbers, strings or lists are refused, whether they come from the command line or a file."""
    loading = sorted(set(kwargs) & _timm_loading_options())
    if loading:
        raise CertifyFxError(f"model {name}: keyword argument(s) {loading} make timm load or download weights or "
                             "configs; a model spec takes architecture arguments only (load weights with --weights, "
                             "or a checkpoint)")
    odd = sorted(k for k, v in kwargs.items() if not _plain(v))
    if odd:
        raise CertifyFxError(f"model {name}: keyword argument(s) {odd} are not plain numbers, strings, booleans or "
                             "lists")
