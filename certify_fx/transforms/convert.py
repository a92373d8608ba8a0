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
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..bounds.capture import configured_input_shape, trace
from ..bounds.compiler import linear_form
from ..errors import ConversionOptionError, UnsupportedNodeError
from ..progress import ProgressLike
from . import (attention_to_spatial_mlp, fold_batchnorm, fold_linear_chains, fold_linear_residuals,  # noqa: F401
               linearize_residual_branches, remove_normalization, replace_activations, replace_gates,
               replace_max_pool, rescale_layers, split_norm_act, trim_kernels)  # registers the passes
from .calibrate import calibrate
from .converted_model import ConvertedModel
from .log import rewrite_log
from .passes import PASSES, Option, check_order, options_of, resolve_options, run_passes

__all__ = ["convert", "convert_structure", "CONVERT_OPTIONS", "PIPELINES", "TARGETS", "check_supported"]

#: the passes of each conversion target, in order (``rescale_layers`` runs last unless ``rescale=False``)
PIPELINES: dict[str, list[str]] = {
    "liresnet": ["split_norm_act", "fold_batchnorm", "replace_gates", "linearize_residual_branches",
                 "replace_activations", "fold_linear_residuals", "fold_linear_chains", "remove_normalization",
                 "replace_max_pool", "trim_kernels", "rescale_layers"],
    "lipschitz-vit": ["split_norm_act", "fold_batchnorm", "replace_gates", "remove_normalization",
                      "attention_to_spatial_mlp", "linearize_residual_branches", "replace_activations",
                      "fold_linear_chains", "fold_linear_residuals", "rescale_layers"],
    "lipschitz": ["split_norm_act", "fold_batchnorm", "replace_gates", "remove_normalization",
                  "attention_to_spatial_mlp", "replace_activations", "fold_linear_residuals", "fold_linear_chains",
                  "replace_max_pool", "trim_kernels", "rescale_layers"],
}
TARGETS = tuple(PIPELINES)
for _names in PIPELINES.values():
    check_order(_names)
#: keyword options of :func:`convert` besides the target and the input, from the passes' own
#: declarations (recipes' ``model.convert_options`` and the CLI check against it)
CONVERT_OPTIONS: dict[str, Option] = options_of(PASSES[name] for names in PIPELINES.values() for name in names)


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
    check: bool = True,
    progress: ProgressLike | None = None,
    calibration_data: torch.Tensor | None = None,
    **options: Any,
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
        check: verify that :func:`certify_fx.bound` accepts the result (cheap, structural).
        progress: a progress display (:func:`certify_fx.progress.progress_display`) to show one
            step per pass on.
        calibration_data: a batch of inputs (a few hundred training images; no labels): after the
            structural passes, every replaced block and the classifier are refitted to what the
            source computed on them (:func:`~certify_fx.transforms.calibrate`), so the converted
            model keeps what the source learned; fit errors and agreement with the source's
            predictions are logged.
        options: the passes' options (:data:`CONVERT_OPTIONS`): ``activation`` (``"minmax"`` or
            ``"groupsort"``), ``bottleneck`` (``"auto"`` keeps a bottleneck branch's convs factored
            when that has fewer parameters than the composed conv, bounded as exactly;
            ``"composed"``/``"factored"`` force one form), ``max_pool`` (``"keep"`` overlapping
            max-pools, bounded by sqrt of the overlap, or ``"conv"``), ``rescale`` (True: divide each
            linear layer by its estimated norm where above 1, so the model starts with a sane bound;
            predictions are unchanged for positively homogeneous networks).

    Raises:
        ConversionOptionError: unknown target or options (a ValueError).
        UnsupportedNodeError: a node no pass could make Lipschitz; names the node and op.
    """
    if to not in PIPELINES:
        raise ConversionOptionError(f"unknown conversion target {to!r}; choose one of {', '.join(TARGETS)}")
    chosen = resolve_options(options, CONVERT_OPTIONS)
    shape = _input_shape(model, example_input, input_shape)
    source = copy.deepcopy(model).eval()
    gm = trace(source)
    gm.eval()
    rewrite_log(gm)
    task = progress.add_task(f"convert to {to}", total=len(PIPELINES[to]) + check, info="") if progress else None
    names = PIPELINES[to]
    if calibration_data is not None:
        # the fit needs the model the passes made; rescaling after it keeps its predictions
        cut = names.index("rescale_layers") if "rescale_layers" in names else len(names)
        gm = run_passes(gm, names[:cut], shape, chosen, progress, task)
        if task is not None:
            progress.update(task, info="calibrate")
        calibrate(gm, model, calibration_data.to(next(gm.parameters()).device), progress=progress)
        names = names[cut:]
    gm = run_passes(gm, names, shape, chosen, progress, task)
    if task is not None:
        progress.update(task, info="check_supported")
    gm.input_shape = shape
    gm.conversion = {"to": to, **chosen, "input_shape": list(shape)}
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


def convert_structure(model: nn.Module, to: str, input_shape: Sequence[int], check: bool = False,
                      **options: Any) -> ConvertedModel:
    """The model :func:`convert` makes with ``options``, without the passes that only set weight
    values (``rescale``): the structure to load a converted model's saved weights into."""
    weights_only = {name: False for name, option in CONVERT_OPTIONS.items() if not option.structural}
    return convert(model, to, input_shape=input_shape, check=check, **{**options, **weights_only})
