"""torch.fx passes that rewrite models into tightly certifiable ones (one module per pass).

Every pass is a function ``pass(gm, input_shape, **options) -> GraphModule`` that appends
:class:`Rewrite` entries to ``gm.rewrite_log``, registered with
:func:`~certify_fx.transforms.passes.conversion_pass` (options, order) and run by
:func:`~certify_fx.transforms.passes.run_passes`. Exact passes (outputs unchanged): ``split_norm_act``,
``fold_batchnorm``, ``fold_linear_residuals``, ``fold_linear_chains``. Passes that change the
function (and log it): ``replace_activations``, ``linearize_residual_branches``,
``attention_to_spatial_mlp``, ``remove_normalization``, ``replace_gates``, ``replace_max_pool``,
``rescale_layers``.
"""

from .attention_to_spatial_mlp import attention_to_spatial_mlp
from .convert import PIPELINES, TARGETS, check_supported, convert
from .converted_model import ConvertedModel
from .fold_batchnorm import fold_batchnorm
from .fold_linear_chains import fold_linear_chains
from .fold_linear_residuals import fold_linear_residuals
from .linearize_residual_branches import linearize_residual_branches
from .log import Rewrite, rewrite_log
from .remove_normalization import remove_normalization
from .replace_activations import replace_activations
from .replace_gates import replace_gates
from .replace_max_pool import replace_max_pool
from .rescale_layers import rescale_layers
from .calibrate import BlockFit, Calibration, calibrate
from .split_norm_act import split_norm_act

__all__ = [
    "BlockFit",
    "Calibration",
    "ConvertedModel",
    "PIPELINES",
    "Rewrite",
    "TARGETS",
    "attention_to_spatial_mlp",
    "calibrate",
    "check_supported",
    "convert",
    "fold_batchnorm",
    "fold_linear_chains",
    "fold_linear_residuals",
    "linearize_residual_branches",
    "remove_normalization",
    "replace_activations",
    "replace_gates",
    "replace_max_pool",
    "rescale_layers",
    "rewrite_log",
    "split_norm_act",
]
