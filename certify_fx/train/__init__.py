"""Recipe-driven GloRo training: schema, trainer, eps schedules, checkpoints, distributed helpers.

>>> from certify_fx.train import load_recipe, train
>>> history = train(load_recipe("recipes/fashion_mnist.yaml", ["epochs=2"]))
"""

from ..model_record import build_model
from ..recipe import (
    BoundConfig,
    DataConfig,
    EpsConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    apply_overrides,
    build_split,
    load_recipe,
    recipe_from_dict,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistributedContext
from ..schedules import eps_schedule, linear_ramp
from .interrupt import TrainingInterrupted
from .run_dir import RunDir
from .runs import RunSummary, find_runs
from .trainer import CHECKPOINT_NAME, LOG_NAME, Trainer, history_table, train

__all__ = [
    "BoundConfig",
    "CHECKPOINT_NAME",
    "DataConfig",
    "DistributedContext",
    "EpsConfig",
    "LOG_NAME",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RunDir",
    "RunSummary",
    "Trainer",
    "TrainingInterrupted",
    "apply_overrides",
    "build_model",
    "build_split",
    "eps_schedule",
    "find_runs",
    "history_table",
    "linear_ramp",
    "load_checkpoint",
    "load_recipe",
    "recipe_from_dict",
    "save_checkpoint",
    "train",
]
