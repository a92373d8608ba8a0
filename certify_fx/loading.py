"""One loader for every model certify-fx reads: what ``bound``, ``certify``, ``convert`` and recipes
accept, and the Python way to load a trained model.

>>> import certify_fx as cfx
>>> loaded = cfx.load_model("runs/fashion_mnist/checkpoint.pt")   # a training checkpoint
>>> loaded.model, loaded.input_shape, loaded.recipe.data.name

``source`` may be

* a training checkpoint written by ``certify-fx train`` (the recipe rebuilds the model, converted
  or not, and the trained weights are loaded);
* a converted model written by ``certify-fx convert -o`` / :func:`certify_fx.save_converted`;
* a model spec (:class:`~certify_fx.ModelSpec`): a timm name, ``module:attr`` or ``file.py:attr``,
  with ``kwargs`` and optional ``weights`` (a state_dict ``.pt``/``.pth``, ``.safetensors`` or any
  certify-fx file).

No file is unpickled: files are read with ``torch.load(weights_only=True)`` and models rebuilt from
their recorded spec; a file whose model is Python code is rebuilt only with ``trust_source=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torch.utils.data import Dataset

from .bounds.capture import configured_input_shape
from .data import dataset_info
from .errors import CertifyFxError, RecipeError
from .model_record import ModelRecord, read_converted, save_converted
from .model_spec import ModelSpec
from .recipe import Recipe, build_split, recipe_dataset_info, recipe_from_dict
from .weights import CHECKPOINT_FORMAT, CONVERTED_FORMAT, load_weights, read_payload, save_payload

__all__ = ["EvaluationData", "LoadedModel", "export_model", "is_model_file", "load_model"]

LoadedKind = Literal["checkpoint", "converted", "spec"]
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass
class LoadedModel:
    """A model and what is known about it.

    Attributes:
        model: the ``nn.Module`` in eval mode.
        kind: ``"checkpoint"`` (training checkpoint), ``"converted"`` (convert output) or ``"spec"``.
        spec: rebuilds the unconverted source model.
        input_shape: one input's shape without batch, when the file or the model's config says.
        conversion: the options of :func:`certify_fx.convert` if the model is converted.
        recipe: the training recipe of a checkpoint.
    """

    model: nn.Module
    kind: LoadedKind
    spec: ModelSpec
    input_shape: tuple[int, ...] | None = None
    conversion: dict[str, Any] | None = None
    recipe: Recipe | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        suffix = f" ({self.conversion['to']})" if self.conversion else ""
        return f"{self.spec}{suffix}"

    def evaluation_data(self, data: str | None = None, root: str | None = None,
                        limit: int | None = None) -> "EvaluationData":
        """The test set to evaluate this model on: its training recipe's (a checkpoint), or the
        dataset named ``data``, read from ``root`` (default: the dataset's), the first ``limit``
        examples.

        Raises:
            RecipeError: no dataset is known (a model that is not a training checkpoint needs
                ``data``), or its inputs do not fit the model.
            DatasetNotFoundError: the files are missing (before anything slow happens).
        """
        if self.recipe is not None:
            recipe = self.recipe
        elif data is None:
            raise RecipeError(f"{self.name} carries no dataset (only training checkpoints do): pass --data NAME")
        else:
            recipe = Recipe()
            recipe.data.name = data
        if root:
            recipe.data.root = root
        recipe.data.eval_subset = limit or recipe.data.eval_subset
        name = data or recipe.data.name
        shape = tuple((recipe_dataset_info(recipe) if data is None else dataset_info(name)).input_shape)
        if self.input_shape is not None and tuple(self.input_shape) != shape:
            raise RecipeError(f"--data {name} has inputs {shape}, but the model takes {tuple(self.input_shape)}")
        return EvaluationData(recipe, name, shape, build_split(recipe, "test", name=data))


@dataclass
class EvaluationData:
    """The test set a loaded model is evaluated on, and the recipe it comes from."""

    recipe: Recipe
    name: str
    input_shape: tuple[int, ...]
    dataset: Dataset


def is_model_file(source: str | Path) -> bool:
    """Whether ``source`` names a weights/model file rather than a model spec."""
    text = str(source)
    return text.endswith(_WEIGHT_SUFFIXES) or (Path(text).is_file() and not text.endswith(".py") and ":" not in text)


def load_model(source: str | Path, *, kwargs: dict[str, Any] | None = None, weights: str | Path | None = None,
               weights_key: str | None = None, trust_source: bool = False) -> LoadedModel:
    """Load a training checkpoint, a converted model, or build a model spec (see the module doc).

    Args:
        source: a file written by certify-fx, or a spec (``resnet18``, ``pkg.mod:attr``,
            ``./net.py:Net``).
        kwargs: keyword arguments for a spec (e.g. ``{"num_classes": 10, "in_chans": 1}``).
        weights: weights to load into a spec's model, strictly.
        weights_key: the entry or name prefix of ``weights`` that holds the model's weights
            (:func:`certify_fx.load_weights`), for files that hold more than one model.
        trust_source: allow rebuilding a model whose recorded source is Python code. A spec given
            as ``source`` is code the caller named, and is always built.

    Raises:
        CertifyFxError: unreadable files, unknown models (with the closest names), weights that do
            not fit (naming the keys).
    """
    if is_model_file(source):
        if kwargs or weights:
            raise CertifyFxError(f"{source} is a file with its own model and weights; model kwargs and weights "
                                 "apply to a model name or file.py:attr")
        path = Path(source)
        payload = read_payload(path)
        if path.suffix == ".safetensors" and payload.get("format") != CONVERTED_FORMAT:
            raise CertifyFxError(f"{path} holds only weights; name the model and give the file as its weights "
                                 f"(CLI: MODEL --weights {path})")
        fmt = payload.get("format") if isinstance(payload, dict) else None
        if fmt == CHECKPOINT_FORMAT:
            recipe = recipe_from_dict(payload["recipe"])
            record = ModelRecord.from_recipe(recipe)
            model = record.load(payload["model"], trust_source, where=str(path))
            return LoadedModel(model.eval(), "checkpoint", record.spec, record.input_shape,
                               getattr(model, "conversion", None), recipe)
        if fmt == CONVERTED_FORMAT:
            record, state = read_converted(path)
            model = record.load(state, trust_source, where=str(path))
            return LoadedModel(model.eval(), "converted", record.spec, record.input_shape, model.conversion)
        raise CertifyFxError(f"{path} is not a certify-fx checkpoint or converted model; if it holds weights, "
                             f"name the model and give it as weights (CLI: MODEL --weights {path})")
    spec = ModelSpec.parse(str(source), kwargs)
    model = spec.build(trust_source=True)
    if weights is not None:
        load_weights(model, weights, weights_key)
    elif weights_key is not None:
        raise CertifyFxError("a weights key needs a weights file (CLI: --weights FILE --weights-key KEY)")
    return LoadedModel(model.eval(), "spec", spec, configured_input_shape(model))


def export_model(loaded: LoadedModel, path: str | Path) -> str:
    """Write ``loaded``'s weights to ``path`` (``.safetensors`` or ``.pt``); returns what was written.

    A converted model (from a checkpoint or a convert file) is written as a converted model, which
    every command reads on its own; any other model as a plain ``state_dict``, to be given as
    ``--weights`` with its model name.
    """
    if loaded.conversion is not None:
        save_converted(loaded.model, path, loaded.spec)
        return f"converted model ({loaded.name}); read it with: certify-fx bound {path}"
    save_payload(loaded.model.state_dict(), path, {"source": loaded.spec.to_dict()})
    kwargs = "".join(f" --kwarg {k}={json.dumps(v, separators=(',', ':'))}" for k, v in loaded.spec.kwargs.items())
    return f"weights of {loaded.spec}; use them with: certify-fx bound {loaded.spec.target}{kwargs} --weights {path}"
