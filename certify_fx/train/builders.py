"""Building a recipe's model and datasets (shared by the trainer and ``certify-fx certify``)."""

from __future__ import annotations

import timm
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import DatasetInfo, build_dataset, dataset_info
from ..errors import RecipeError
from .recipe import Recipe

__all__ = ["build_model", "build_split", "recipe_dataset_info"]


def recipe_dataset_info(recipe: Recipe) -> DatasetInfo:
    synthetic = {k: v for k, v in recipe.data.synthetic.items() if k in ("num_classes", "in_chans", "img_size")}
    return dataset_info(recipe.data.name, **synthetic)


def build_model(recipe: Recipe) -> nn.Module:
    """``timm.create_model(recipe.model.name)`` sized for the recipe's dataset.

    certify-fx families also get the input size and the dataset's mean/std (normalisation lives
    inside the model, so certificates are in [0, 1] pixel space); ``model.kwargs`` override all.
    """
    from .. import models  # noqa: F401  (registers the certify-fx families with timm)

    name = recipe.model.name
    if not timm.is_model(name):
        ours = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("certify_fx"))
        raise RecipeError(f"recipe key 'model.name': unknown model {name!r}; certify-fx models: {', '.join(ours)} "
                          "(or any timm model name)")
    info = recipe_dataset_info(recipe)
    kwargs: dict = {"num_classes": info.num_classes, "in_chans": info.in_chans}
    if timm.models.model_entrypoint(name).__module__.startswith("certify_fx"):
        kwargs.update(img_size=info.img_size, mean=list(info.mean), std=list(info.std))
    kwargs.update(recipe.model.kwargs)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise RecipeError(f"recipe key 'model.kwargs' does not fit {name}: {exc}") from None


def build_split(recipe: Recipe, split: str, name: str | None = None) -> Dataset:
    """The recipe's ``train`` or ``test`` split (``name`` overrides the dataset), subset if asked."""
    d = recipe.data
    synthetic = {"seed": recipe.seed, **d.synthetic}
    dataset = build_dataset(name or d.name, split, d.root, d.augment, d.crop_padding, synthetic)
    limit = d.train_subset if split == "train" else d.eval_subset
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
