"""The recipe: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides, and the
data it names.

A recipe says which model (source, weights, conversion), which data and how to train; the
trainer runs it, and the loader reads it back from a checkpoint to rebuild the model and its test
set. Every key is checked: an unknown key is an error naming the key and the allowed ones, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from torch.utils.data import Dataset, Subset

from .data import AUGMENTATIONS, DATASETS, DatasetInfo, build_dataset, build_transform, dataset_info, extra_dataset
from .errors import RecipeError, did_you_mean
from .losses import LOSSES, loss_options
from .schedules import EPS_SCHEDULES, LR_SCHEDULES
from .transforms.convert import CONVERT_OPTIONS, TARGETS

__all__ = [
    "BoundConfig",
    "DataConfig",
    "DistillConfig",
    "EpsConfig",
    "ExtraDataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "apply_overrides",
    "build_extra",
    "build_split",
    "load_recipe",
    "recipe_dataset_info",
    "recipe_from_dict",
]


@dataclass
class ExtraDataConfig:
    """Extra images (e.g. generated ones) mixed into every training batch at a fixed ratio."""

    path: str | None = None  #: an .npz of images and labels, or a folder of class-index sub-folders
    ratio: float = 0.0  #: fraction of each batch drawn from them (0.75: 3 extra to 1 real)


@dataclass
class DataConfig:
    """Which dataset, where it is, how it is augmented and batched."""

    name: str = "fashion_mnist"
    root: str | None = None  #: folder with the files; ``None``: the dataset's default location
    augment: list[str] = field(default_factory=list)  #: crop, resized_crop, flip, randaugment, cutout
    crop_padding: int = 4
    batch_size: int = 256  #: global batch, split evenly over processes
    eval_batch_size: int = 1000
    num_workers: int = 0
    train_subset: int | None = None  #: use only the first N training examples
    eval_subset: int | None = None  #: evaluate only the first N test examples
    synthetic: dict = field(default_factory=dict)  #: options of the synthetic dataset
    extra: ExtraDataConfig = field(default_factory=ExtraDataConfig)


@dataclass
class ModelConfig:
    """The model: a source (timm name, ``module:attr`` or ``file.py:attr``), optional source
    weights, and an optional conversion into a certifiable model (:func:`certify_fx.convert`)."""

    name: str = "liresnet_l6w32"  #: timm name (certify-fx families included), module:attr or file.py:attr
    kwargs: dict = field(default_factory=dict)
    #: source weights loaded before converting: a certify-fx checkpoint, a converted model, a
    #: plain state_dict (.pt/.pth) or .safetensors (read at the start of a run only)
    checkpoint: str | None = None
    convert: str = "none"  #: liresnet | lipschitz-vit | lipschitz | none
    convert_options: dict = field(default_factory=dict)  #: keyword options of certify_fx.convert
    #: when the recipe converts a model with source weights, fit the converted model to the source
    #: on this many training images first (:func:`certify_fx.transforms.calibrate`; memory grows with
    #: images x activation size); 0: off
    calibration: int = 2048


@dataclass
class LossConfig:
    """A loss of :data:`certify_fx.losses.LOSSES`, its options, and TRADES' lambda schedule."""

    name: str = "emma"
    options: dict = field(default_factory=dict)
    #: GloRo App. B "x, y, e": lambda goes linearly from ``lam_start`` to ``options.lam`` over
    #: ``lam_epochs`` epochs (unset: constant).
    lam_start: float | None = None
    lam_epochs: float | None = None


@dataclass
class EpsConfig:
    """The certification radius and the training radius schedule."""

    eps: float = 36 / 255  #: radius the model is trained for (and certified at)
    schedule: str = "liresnet"  #: liresnet | linear | log | fixed
    #: linear/log: eps_train goes from ``start * eps`` to ``train_multiplier * eps`` over the first
    #: ``ramp_fraction`` of training; ``liresnet`` is linear with 0.1, 2.0, 0.5 (App. B).
    start: float = 0.1
    train_multiplier: float = 2.0
    ramp_fraction: float = 0.5
    evaluate: list[float] = field(default_factory=list)  #: radii to report VRA at (default: [eps])


@dataclass
class OptimConfig:
    """Optimiser (any ``timm.optim`` name) and learning-rate schedule."""

    opt: str = "lookahead_nadam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  #: cosine | constant | multistep
    #: multistep: epochs at which the learning rate is multiplied by ``decay_rate``
    decay_milestones: list[float] = field(default_factory=list)
    decay_rate: float = 0.1
    warmup_epochs: float = 20.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    grad_clip: float | None = None


@dataclass
class BoundConfig:
    """Lipschitz bounds: power iteration in training, the proven bound at evaluation."""

    power_steps: int = 1  #: power-iteration steps per training step (iterates persist)
    #: after each epoch, run power iteration to convergence (at most this many steps, GloRo App. B)
    converge_steps: int = 200
    eval_every: int = 1  #: epochs between evaluations (the last epoch is always evaluated)


@dataclass
class DistillConfig:
    """Distillation from the source while certifying: the loss gains ``weight * T^2 KL(softmax(teacher
    / T) || softmax(student / T))``; the teacher runs in eval mode without gradients."""

    #: ``auto``: the recipe's ``model.checkpoint`` in the unconverted source model, when the recipe
    #: converts a model with source weights; a file of the kinds ``model.checkpoint`` takes; ``none``
    teacher: str = "auto"
    weight: float = 0.5
    temperature: float = 1.0

    def teacher_weights(self, model: ModelConfig) -> str | None:
        """The teacher's weights file for a recipe's ``model`` section, or None (no distillation)."""
        if self.teacher in ("none", "") or self.weight == 0:
            return None
        if self.teacher == "auto":
            return model.checkpoint if model.convert != "none" and model.checkpoint else None
        return self.teacher


@dataclass
class Recipe:
    """Everything that defines a training run; a checkpoint stores it, so a run can be resumed
    and certified without the YAML file."""

    seed: int = 0
    epochs: int = 10
    output_dir: str = "runs/default"
    checkpoint_every: int = 1  #: epochs between checkpoints (the last epoch is always written)
    #: also checkpoint every N steps inside an epoch (0: only at epoch ends and on Ctrl-C/SIGTERM)
    checkpoint_every_steps: int = 0
    device: str = "auto"  #: auto (cuda if available) | cpu | cuda
    amp: bool = True  #: bf16 autocast on CUDA (the bound stays fp32); ignored on CPU
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eps: EpsConfig = field(default_factory=EpsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    bound: BoundConfig = field(default_factory=BoundConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def eval_eps(self) -> list[float]:
        return [float(e) for e in (self.eps.evaluate or [self.eps.eps])]


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to the field's type, or a RecipeError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _check_value(value, inner[0], key)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        if isinstance(value, dict):
            raise RecipeError(f"recipe key {key!r} must be a list, got {type(value).__name__}")
        if not isinstance(value, (list, tuple)):
            value = [value]  # `--set eps.evaluate=0.1` means [0.1]
        (item,) = typing.get_args(annotation)
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    expected = origin or annotation
    if expected is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        raise RecipeError(f"recipe key {key!r} must be {getattr(expected, '__name__', expected)}, "
                          f"got {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe section {prefix or 'root'!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        where = f"in section {prefix!r}" if prefix else "at the top level"
        full = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise RecipeError(f"unknown recipe key {full!r} {where}{did_you_mean(unknown[0], fields)}; "
                          f"allowed: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        values[name] = _build(hint, value, key) if dataclasses.is_dataclass(hint) else _check_value(value, hint, key)
    return cls(**values)


def recipe_from_dict(raw: dict) -> Recipe:
    """A :class:`Recipe` from nested plain data (YAML or a checkpoint), every key checked."""
    recipe = _build(Recipe, raw or {}, "")
    _validate(recipe)
    return recipe


def _validate(r: Recipe) -> None:
    checks = [
        (r.data.name in DATASETS, "data.name", r.data.name, list(DATASETS)),
        (r.loss.name in LOSSES, "loss.name", r.loss.name, list(LOSSES)),
        (r.eps.schedule in EPS_SCHEDULES, "eps.schedule", r.eps.schedule, list(EPS_SCHEDULES)),
        (r.optim.schedule in LR_SCHEDULES, "optim.schedule", r.optim.schedule, list(LR_SCHEDULES)),
        (r.device in ("auto", "cpu", "cuda"), "device", r.device, ["auto", "cpu", "cuda"]),
        (r.model.convert in (*TARGETS, "none"), "model.convert", r.model.convert, [*TARGETS, "none"]),
    ]
    for ok, key, value, allowed in checks:
        if not ok:
            raise RecipeError(f"recipe key {key!r} has unknown value {value!r}{did_you_mean(value, allowed)}; "
                              f"allowed: {', '.join(allowed)}")
    _validate_loss_options(r, loss_options(r.loss.name))
    for key, value in r.model.convert_options.items():
        if key not in CONVERT_OPTIONS:
            raise RecipeError(f"unknown recipe key 'model.convert_options.{key}'; allowed: {', '.join(CONVERT_OPTIONS)}")
        try:
            CONVERT_OPTIONS[key].check(value)
        except ValueError as exc:
            raise RecipeError(f"recipe key 'model.convert_options.{key}': {exc}") from None
    if r.model.convert_options and r.model.convert == "none":
        raise RecipeError("recipe key 'model.convert_options' is set but model.convert is 'none'")
    for a in r.data.augment:
        if a not in AUGMENTATIONS:
            raise RecipeError(f"recipe key 'data.augment' has unknown value {a!r}; allowed: {', '.join(AUGMENTATIONS)}")
    for key, value in [("epochs", r.epochs), ("data.batch_size", r.data.batch_size),
                       ("checkpoint_every", r.checkpoint_every), ("data.eval_batch_size", r.data.eval_batch_size)]:
        if value < 1:
            raise RecipeError(f"recipe key {key!r} must be >= 1, got {value}")
    if r.checkpoint_every_steps < 0:
        raise RecipeError(f"recipe key 'checkpoint_every_steps' must be >= 0, got {r.checkpoint_every_steps}")
    if r.model.calibration < 0:
        raise RecipeError(f"recipe key 'model.calibration' must be >= 0 (images; 0: off), got {r.model.calibration}")
    if r.distill.weight < 0 or r.distill.temperature <= 0:
        raise RecipeError(f"recipe keys 'distill.weight' must be >= 0 and 'distill.temperature' > 0, got "
                          f"{r.distill.weight} and {r.distill.temperature}")
    extra = r.data.extra
    if extra.path is not None and not 0 < extra.ratio < 1:
        raise RecipeError(f"recipe key 'data.extra.ratio' must be in (0, 1) (the fraction of each batch taken from "
                          f"data.extra.path), got {extra.ratio}")
    if extra.path is None and extra.ratio:
        raise RecipeError("recipe key 'data.extra.ratio' is set but 'data.extra.path' is not")
    if r.eps.eps < 0 or r.optim.lr <= 0 or r.bound.power_steps < 0:
        raise RecipeError("eps.eps must be >= 0, optim.lr > 0 and bound.power_steps >= 0")


def _validate_loss_options(r: Recipe, allowed: dict[str, Any]) -> None:
    """Every ``loss.options`` key is a parameter of the loss, with a value of its type."""
    name = r.loss.name
    for key, value in r.loss.options.items():
        if key not in allowed:
            takes = f"{name} takes {', '.join(allowed)}" if allowed else f"{name} takes no options"
            raise RecipeError(f"unknown recipe key 'loss.options.{key}'{did_you_mean(key, allowed)}; {takes}")
        _check_value(value, allowed[key], f"loss.options.{key}")
    if r.loss.lam_start is not None and "lam" not in allowed:
        raise RecipeError(f"recipe key 'loss.lam_start' ramps the option 'lam', which loss {name!r} does not take")


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """``raw`` with ``key.sub=value`` overrides applied (values parsed as YAML: ``3``, ``1e-3``,
    ``[crop, flip]``, ``null``)."""
    raw = dict(raw or {})
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value (e.g. --set data.batch_size=128)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {key!r}: cannot parse value {text!r}: {exc}") from None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (``yaml.safe_load``), apply overrides, check every key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys, got {type(raw).__name__}")
    return recipe_from_dict(apply_overrides(raw or {}, overrides))


def recipe_dataset_info(recipe: Recipe) -> DatasetInfo:
    """Shape, classes and statistics of the recipe's dataset."""
    synthetic = {k: v for k, v in recipe.data.synthetic.items() if k in ("num_classes", "in_chans", "img_size")}
    return dataset_info(recipe.data.name, **synthetic)


def build_split(recipe: Recipe, split: str, name: str | None = None) -> Dataset:
    """The recipe's ``train`` or ``test`` split (``name`` overrides the dataset), subset if asked."""
    d = recipe.data
    synthetic = {"seed": recipe.seed, **d.synthetic}
    dataset = build_dataset(name or d.name, split, d.root, d.augment, d.crop_padding, synthetic)
    limit = d.train_subset if split == "train" else d.eval_subset
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset


def build_extra(recipe: Recipe) -> Dataset | None:
    """The recipe's extra training images (``data.extra.path``) with the training augmentation, or None."""
    d = recipe.data
    if d.extra.path is None:
        return None
    info = recipe_dataset_info(recipe)
    transform = build_transform(info.img_size, d.augment, d.crop_padding) if d.augment else None
    return extra_dataset(d.extra.path, info.input_shape, info.num_classes, transform)
