"""What a model file says about its model: the one record of "source spec + conversion + weights".

A converted model is a GraphModule whose Python code is generated; pickling it would mean running
that code on load. So no certify-fx file holds a model object: a converted-model file and a
training checkpoint both hold a :class:`ModelRecord` (where the source model comes from, the
conversion options, the input shape) and the weights, as tensors and plain data read with
``torch.load(weights_only=True)`` or safetensors. Loading rebuilds the source model, re-runs the
(deterministic) conversion without the passes that only set weight values, and loads the weights
strictly. This module is the only one that reads and writes that record; the loader
(:mod:`certify_fx.loading`) and the trainer build on it.

Only timm model names (and certify-fx's own registered models) are rebuilt by default; a record
whose source is Python code is imported only with ``trust_source=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .data import first_images
from .errors import CertifyFxError, CheckpointError, RecipeError
from .model_spec import ModelSpec
from .recipe import Recipe, build_split, recipe_dataset_info
from .transforms.convert import convert, convert_structure
from .weights import CONVERTED_FORMAT, load_weights, read_payload, save_payload

__all__ = ["CONVERTED_VERSION", "ModelRecord", "build_model", "build_teacher", "calibration_images", "load_converted",
           "read_converted", "save_converted"]

#: the version of the converted-model file layout this certify-fx writes and reads
CONVERTED_VERSION = 1


@dataclass(frozen=True)
class ModelRecord:
    """How to rebuild a model's structure: its source and, if converted, the conversion.

    Attributes:
        spec: the unconverted source model (a timm name, ``module:attr`` or ``file.py:attr``, with kwargs).
        conversion: :func:`certify_fx.convert`'s target and options (with ``input_shape``), or None.
        input_shape: one input's shape without batch, when known.
    """

    spec: ModelSpec
    conversion: Mapping[str, Any] | None = None
    input_shape: tuple[int, ...] | None = None

    @classmethod
    def of(cls, model: nn.Module, spec: ModelSpec | Mapping[str, Any]) -> ModelRecord:
        """The record of ``model`` built from ``spec`` (converted if ``model`` came from :func:`convert`)."""
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
        conversion = getattr(model, "conversion", None)
        shape = tuple(conversion["input_shape"]) if conversion else None
        return cls(spec, dict(conversion) if conversion else None, shape)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> ModelRecord:
        """The model a recipe trains: its source sized for its dataset, converted by ``model.convert``.

        timm models get ``num_classes`` and ``in_chans``; certify-fx families also the input size
        and the dataset's mean/std (normalisation lives inside the model, so certificates are in
        [0, 1] pixel space). Python-code models get only ``model.kwargs``. ``model.kwargs``
        override all.
        """
        try:
            spec = ModelSpec.parse(recipe.model.name)
        except CertifyFxError as exc:
            raise RecipeError(f"recipe key 'model.name': {exc}") from None
        info = recipe_dataset_info(recipe)
        kwargs: dict = {}
        if spec.kind == "timm":
            kwargs.update(num_classes=info.num_classes, in_chans=info.in_chans)
            if spec.is_certify_fx_family:
                kwargs.update(img_size=info.img_size, mean=list(info.mean), std=list(info.std))
        shape = tuple(info.input_shape)
        conversion = (None if recipe.model.convert == "none" else
                      {"to": recipe.model.convert, **recipe.model.convert_options, "input_shape": list(shape)})
        return cls(spec.with_kwargs(**{**kwargs, **recipe.model.kwargs}), conversion, shape)

    def build(self, trust_source: bool = False, *, weights: str | Path | None = None,
              structure_only: bool = False) -> nn.Module:
        """The model: the source built from ``spec``, its ``weights`` loaded strictly, then converted.

        Args:
            trust_source: allow a source that is Python code to be imported.
            weights: source weights (before conversion), any file :func:`certify_fx.load_weights` reads.
            structure_only: convert without the passes that only set weight values (``rescale``):
                the structure to load a converted model's own weights into.
        """
        return self.convert(self.spec.build(trust_source), weights=weights, structure_only=structure_only)

    def convert(self, model: nn.Module, *, weights: str | Path | None = None, structure_only: bool = False,
                calibration_data: torch.Tensor | None = None) -> nn.Module:
        """``model`` (the source, built from ``spec``) with ``weights`` loaded, then converted as
        recorded (see :meth:`build`), calibrated to the source on ``calibration_data`` if given."""
        if weights is not None:
            load_weights(model, weights)
        if self.conversion is None:
            return model
        options = {k: v for k, v in self.conversion.items() if k not in ("to", "input_shape")}
        if structure_only:
            return convert_structure(model.eval(), to=self.conversion["to"], input_shape=self.conversion["input_shape"],
                                     **options)
        return convert(model.eval(), to=self.conversion["to"], input_shape=self.conversion["input_shape"],
                       calibration_data=calibration_data, **options)

    def load(self, state: Mapping[str, torch.Tensor], trust_source: bool = False, where: str = "the file") -> nn.Module:
        """The model's structure rebuilt (:meth:`build` with ``structure_only``) and ``state`` loaded strictly."""
        model = self.build(trust_source, structure_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            older = self._composed_blocks(state, trust_source)  # saved before basic blocks were factored
            if older is not None:
                return older
            raise CheckpointError(f"{where}: the weights do not fit {self.name} (saved by another certify-fx or "
                                  f"timm version?): {str(exc).splitlines()[0]}") from None
        return model

    def _composed_blocks(self, state: Mapping[str, torch.Tensor], trust_source: bool) -> nn.Module | None:
        """The model with ``state`` loaded as certify-fx 0.1.0 converted it (a basic or
        downsampling block as one composed conv under ``bottleneck="auto"``, kernels untrimmed),
        if that fits."""
        if self.conversion is None or "trim" in self.conversion or self.conversion.get("bottleneck", "auto") != "auto":
            return None
        older = replace(self, conversion={**self.conversion, "bottleneck": "composed", "trim": False})
        model = older.build(trust_source, structure_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            return None
        return model

    @property
    def name(self) -> str:
        return f"{self.spec}" + (f" ({self.conversion['to']})" if self.conversion else "")

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (the ``source`` and ``conversion`` keys of a converted-model file)."""
        return {"source": self.spec.to_dict(), "conversion": dict(self.conversion) if self.conversion else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRecord:
        conversion = data.get("conversion")
        shape = tuple(conversion["input_shape"]) if conversion else None
        return cls(ModelSpec.from_dict(data["source"]), conversion, shape)


def build_model(recipe: Recipe, *, source_weights: bool = True, trust_source: bool = False) -> nn.Module:
    """The recipe's model: the source model, its ``model.checkpoint`` weights (when
    ``source_weights``), converted by ``model.convert``. Without ``source_weights`` only the
    structure is built (a checkpoint's own weights are loaded into it).

    Raises:
        RecipeError: an unknown model or arguments it does not take.
        CheckpointError: source weights that are unreadable or do not fit.
    """
    record = ModelRecord.from_recipe(recipe)
    weights = recipe.model.checkpoint if source_weights and recipe.model.checkpoint else None
    try:
        source = record.spec.build(trust_source)
    except CertifyFxError as exc:
        raise RecipeError(f"recipe key 'model': {exc}") from None
    images = (calibration_images(recipe, recipe.model.calibration)
              if weights is not None and record.conversion is not None and recipe.model.calibration else None)
    return record.convert(source, weights=weights, structure_only=not source_weights, calibration_data=images)


def build_teacher(recipe: Recipe, trust_source: bool = False,
                  state: Mapping[str, torch.Tensor] | None = None) -> nn.Module | None:
    """The recipe's distillation teacher (``distill.teacher``: the unconverted source model with
    those weights, in eval mode and without gradients), or None. ``state``: the teacher's weights
    as a checkpoint saved them (a resumed run), read instead of the file."""
    weights = recipe.distill.teacher_weights(recipe.model)
    if weights is None:
        return None
    record = ModelRecord.from_recipe(recipe)
    try:
        teacher = record.spec.build(trust_source)
    except CertifyFxError as exc:
        raise RecipeError(f"recipe key 'model': {exc}") from None
    if state is not None:
        teacher.load_state_dict(state)
    else:
        load_weights(teacher, weights)
    return teacher.eval().requires_grad_(False)


def calibration_images(recipe: Recipe, count: int) -> torch.Tensor:
    """The first ``count`` images of the recipe's training split, without augmentation."""
    return first_images(build_split(replace(recipe, data=replace(recipe.data, augment=[])), "train"), count)


def save_converted(gm: nn.Module, path: str | Path, source: ModelSpec | Mapping[str, Any]) -> None:
    """Save a model returned by :func:`certify_fx.convert` (atomically), as ``.pt`` or ``.safetensors``.

    Args:
        source: how to rebuild the unconverted model: a :class:`~certify_fx.ModelSpec`
            (``ModelSpec.parse("resnet50", {"num_classes": 10})``) or its ``to_dict()``.
    """
    if getattr(gm, "conversion", None) is None:
        raise CertifyFxError("save_converted expects a model returned by certify_fx.convert")
    records = {"format": CONVERTED_FORMAT, "version": CONVERTED_VERSION, **ModelRecord.of(gm, source).to_dict(),
               "rewrite_log": [r.to_dict() for r in getattr(gm, "rewrite_log", [])]}
    save_payload(gm.state_dict(), path, records)


def read_converted(path: str | Path) -> tuple[ModelRecord, dict[str, torch.Tensor]]:
    """The record and weights of a converted-model file (nothing is built)."""
    payload = read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != CONVERTED_FORMAT:
        raise CertifyFxError(f"{path} is not a converted certify-fx model (no {CONVERTED_FORMAT!r} header)")
    if payload.get("version") != CONVERTED_VERSION:
        raise CertifyFxError(f"{path} has format version {payload.get('version')}, this certify-fx reads "
                             f"{CONVERTED_VERSION}")
    return ModelRecord.from_dict(payload), payload["state_dict"]


def load_converted(path: str | Path, trust_source: bool = False) -> nn.Module:
    """Rebuild a converted model saved by :func:`save_converted` (no code from the file runs;
    a model converted from Python code is rebuilt only with ``trust_source=True``)."""
    record, state = read_converted(path)
    return record.load(state, trust_source, where=str(path))
