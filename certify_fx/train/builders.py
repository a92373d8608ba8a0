"""Building a recipe's model and datasets (shared by the trainer and ``certify-fx certify``)."""

from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import DatasetInfo, build_dataset, dataset_info
from ..errors import CertifyFxError, RecipeError
from ..model_spec import ModelSpec
from .recipe import Recipe

__all__ = ["build_model", "build_split", "model_spec", "recipe_dataset_info"]


def recipe_dataset_info(recipe: Recipe) -> DatasetInfo:
    synthetic = {k: v for k, v in recipe.data.synthetic.items() if k in ("num_classes", "in_chans", "img_size")}
    return dataset_info(recipe.data.name, **synthetic)


def model_spec(recipe: Recipe) -> ModelSpec:
    """The source model of a recipe, sized for its dataset.

    timm models get ``num_classes`` and ``in_chans``; certify-fx families also the input size and
    the dataset's mean/std (normalisation lives inside the model, so certificates are in [0, 1]
    pixel space). Python-code models get only ``model.kwargs``. ``model.kwargs`` override all.
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
    return spec.with_kwargs(**{**kwargs, **recipe.model.kwargs})


def build_model(recipe: Recipe, *, source_weights: bool = True, trust_source: bool = False) -> nn.Module:
    """The recipe's model: the source model, its ``model.checkpoint`` weights (when
    ``source_weights``), converted by ``model.convert``.

    A checkpoint of a converted model is restored by rebuilding with ``source_weights=False`` (the
    conversion is deterministic in structure) and loading the trained weights.

    Raises:
        RecipeError: an unknown model, kwargs that do not fit.
        CheckpointError: source weights that are unreadable or do not fit.
    """
    from ..transforms.convert import convert, convert_structure
    from ..weights import load_weights

    spec = model_spec(recipe)
    try:
        model = spec.build(trust_source)
    except CertifyFxError as exc:
        raise RecipeError(f"recipe key 'model': {exc}") from None
    if source_weights and recipe.model.checkpoint:
        load_weights(model, recipe.model.checkpoint)
    if recipe.model.convert == "none":
        return model
    build = convert if source_weights else convert_structure  # without source weights, the caller restores them
    return build(model.eval(), to=recipe.model.convert, input_shape=recipe_dataset_info(recipe).input_shape,
                 check=True, **recipe.model.convert_options)


def build_split(recipe: Recipe, split: str, name: str | None = None) -> Dataset:
    """The recipe's ``train`` or ``test`` split (``name`` overrides the dataset), subset if asked."""
    d = recipe.data
    synthetic = {"seed": recipe.seed, **d.synthetic}
    dataset = build_dataset(name or d.name, split, d.root, d.augment, d.crop_padding, synthetic)
    limit = d.train_subset if split == "train" else d.eval_subset
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
