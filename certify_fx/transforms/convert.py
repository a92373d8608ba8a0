"""``convert``: run the pass pipeline that makes a model tightly certifiable.

Pipelines (each pass a function ``GraphModule -> GraphModule`` in its own module):

* ``"liresnet"``: residual CNNs become LiResNets (linear residual blocks, MinMax, no BatchNorm);
* ``"lipschitz-vit"``: ViTs get spatial-MLP token mixing, Affine instead of LayerNorm, linear FFN
  residuals (LiFFN) followed by MinMax;
* ``"lipschitz"``: the minimal rewrite: exact folds, Affine normalisation, MinMax activations,
  token mixing for attention; residual branches stay nonlinear (bounded with ``1 + ||g||``).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..bounds.compiler import linear_form
from ..errors import UnsupportedNodeError
from ..progress import ProgressLike
from ..bounds.capture import configured_input_shape, trace
from .attention_to_spatial_mlp import attention_to_spatial_mlp
from .converted_model import ConvertedModel
from .fold_batchnorm import fold_batchnorm
from .fold_linear_chains import fold_linear_chains
from .fold_linear_residuals import fold_linear_residuals
from .linearize_residual_branches import linearize_residual_branches
from .log import rewrite_log
from .remove_normalization import remove_normalization
from .replace_activations import replace_activations
from .replace_gates import replace_gates
from .replace_max_pool import replace_max_pool
from .rescale_layers import rescale_layers
from .split_norm_act import split_norm_act

__all__ = ["convert", "CONVERT_OPTIONS", "PIPELINES", "TARGETS", "check_supported"]

Pass = Callable[..., fx.GraphModule]

PIPELINES: dict[str, list[Pass]] = {
    "liresnet": [split_norm_act, fold_batchnorm, replace_gates, linearize_residual_branches, replace_activations,
                 fold_linear_residuals, fold_linear_chains, remove_normalization, replace_max_pool],
    "lipschitz-vit": [split_norm_act, fold_batchnorm, replace_gates, remove_normalization, attention_to_spatial_mlp,
                      linearize_residual_branches, replace_activations, fold_linear_chains, fold_linear_residuals],
    "lipschitz": [split_norm_act, fold_batchnorm, replace_gates, remove_normalization, attention_to_spatial_mlp,
                  replace_activations, fold_linear_residuals, fold_linear_chains, replace_max_pool],
}
TARGETS = tuple(PIPELINES)
#: keyword options of :func:`convert` besides the target and the input (recipes check against it)
CONVERT_OPTIONS = ("activation", "max_pool", "bottleneck", "rescale")

# Which options go to which pass.
_PASS_OPTIONS = {
    replace_activations: {"activation": "to"},
    linearize_residual_branches: {"activation": "activation", "bottleneck": "bottleneck"},
    replace_max_pool: {"max_pool": "mode"},
}


def _input_shape(model: nn.Module, example_input: torch.Tensor | None,
                 input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if example_input is not None:
        return tuple(example_input.shape[1:])
    if input_shape is not None:
        return tuple(input_shape)
    shape = configured_input_shape(model)
    if shape is not None:
        return shape
    raise ValueError("convert needs example_input (a batch) or input_shape, e.g. (3, 224, 224)")


def check_supported(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    """Raise UnsupportedNodeError now if the bound compiler cannot handle some node."""
    linear_form(gm, input_shape)


def convert(
    model: nn.Module,
    to: str = "liresnet",
    example_input: torch.Tensor | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    activation: str = "minmax",
    max_pool: str = "keep",
    bottleneck: str = "auto",
    rescale: bool = True,
    check: bool = True,
    progress: ProgressLike | None = None,
) -> ConvertedModel:
    """Rewrite ``model`` into a certifiable GraphModule (a normal, trainable ``nn.Module``).

    The input model is not modified (the conversion works on a copy, in eval mode) and as many of
    its weights as possible are kept. The result is a :class:`ConvertedModel` (timm's
    ``num_classes``, ``pretrained_cfg`` for [0, 1] pixel inputs, ``get_classifier``,
    ``reset_classifier``, ``forward_features``/``forward_head``) and carries ``rewrite_log`` (list of
    :class:`~certify_fx.transforms.Rewrite`), ``input_shape`` and ``conversion`` (the options).

    Args:
        model: any torch.fx-traceable classifier (timm ResNets and ViTs included).
        to: ``"liresnet"``, ``"lipschitz-vit"`` or ``"lipschitz"``.
        example_input: a batch, to fix the input shape; or give ``input_shape``.
        activation: ``"minmax"`` or ``"groupsort"``.
        max_pool: ``"keep"`` overlapping max-pools (bounded by sqrt of the overlap) or ``"conv"``.
        bottleneck: ``"auto"`` keeps a bottleneck branch's convs factored (``LinearBottleneck``) when
            that has fewer parameters than the composed full-width conv (bounded as exactly);
            ``"composed"`` or ``"factored"`` force one form.
        rescale: divide each linear layer by its estimated norm where above 1 (and biases and
            constants by the factors before them), so the model starts with a sane bound;
            predictions are unchanged for positively homogeneous networks (see ``rescale_layers``).
        check: verify that :func:`certify_fx.bound` accepts the result (cheap, structural).
        progress: a progress display (:func:`certify_fx.progress.progress_display`) to show one
            step per pass on.

    Raises:
        ValueError: unknown target or options.
        UnsupportedNodeError: a node no pass could make Lipschitz; names the node and op.
    """
    if to not in PIPELINES:
        raise ValueError(f"unknown conversion target {to!r}; choose one of {', '.join(TARGETS)}")
    shape = _input_shape(model, example_input, input_shape)
    source = copy.deepcopy(model).eval()
    gm = trace(source)
    gm.eval()
    rewrite_log(gm)
    options = {"activation": activation, "max_pool": max_pool, "bottleneck": bottleneck}
    passes = [*PIPELINES[to], *([rescale_layers] if rescale else [])]
    task = progress.add_task(f"convert to {to}", total=len(passes) + check, info="") if progress else None
    for pass_fn in passes:
        if task is not None:
            progress.update(task, info=pass_fn.__name__)
        kwargs = {arg: options[opt] for opt, arg in _PASS_OPTIONS.get(pass_fn, {}).items()}
        gm = pass_fn(gm, shape, **kwargs)
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.update(task, info="check_supported")
    gm.input_shape = shape
    gm.conversion = {"to": to, "activation": activation, "max_pool": max_pool, "bottleneck": bottleneck,
                     "rescale": rescale, "input_shape": list(shape)}
    gm = ConvertedModel.from_graph_module(gm, shape)
    if check:
        try:
            check_supported(gm, shape)
        except UnsupportedNodeError as exc:
            fix = exc.fix
            if fix and "convert(" in fix:  # advice to convert, after converting, would loop
                fix = ("no conversion pass handles this node yet: replace it in the model (e.g. a squeeze-excitation "
                       "gate by a learned per-channel scale) or register a bound rule (docs/soundness.md)")
            raise UnsupportedNodeError(exc.node, exc.op, f"still not certifiable after converting to {to!r}: "
                                       f"{exc.reason}", fix) from None
    if task is not None:
        progress.remove_task(task)
    return gm
