"""Calibration: fit a converted model to its source on a few hundred unlabelled images.

Converting changes the function: a residual branch loses its activations, ReLU becomes MinMax,
and what the source's layers learned no longer fits together (a CE-trained resnet18 converted to
a LiResNet classifies Fashion-MNIST at chance). Calibration gets the function back where a linear
fit can: walking the converted model from input to output, every replaced block (and the
classifier) is refitted so that its output matches what the corresponding node of the source
computed on the same images, given what the already-calibrated converted model feeds it. The fit
of one affine layer is ridge least squares on activations, in closed form (float64 normal
equations over convolution patches); a factored block refits its last conv with the others kept.

Each fit is logged as a function-changing rewrite with its relative error before and after, and
the agreement of the converted model's predictions with the source's, before and after, closes
the log: where MinMax cannot reproduce a ReLU, the number says how much of the source survived.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..bounds.capture import trace
from ..errors import CertifyFxError
from ..nn import LinearBottleneck, LiResNetBlock
from .log import log_rewrite, rewrite_log

if TYPE_CHECKING:
    from ..progress import ProgressLike

__all__ = ["BlockFit", "Calibration", "calibrate"]

_PASS = "calibrate"


@dataclass(frozen=True)
class BlockFit:
    """One refitted layer: ``module`` of the converted model, fitted to ``source_node``'s value.

    ``error_before`` / ``error_after``: relative error ``||output - target|| / ||target||`` over the
    calibration images, with the converted weights and with the fitted ones.
    """

    module: str
    source_node: str
    error_before: float
    error_after: float


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` did: the fits, in order, and the fraction of calibration images on which
    the converted model predicts the source's class, before and after."""

    fits: list[BlockFit] = field(default_factory=list)
    agreement_before: float = float("nan")
    agreement_after: float = float("nan")
    images: int = 0


class _Probe(fx.Interpreter):
    """Runs a traced source model and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = value
        return value


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def _fitted_layers(module: nn.Module) -> list[nn.Module]:
    """The affine layers whose weights a fit replaces (jointly): the module itself, a LiResNet
    block's conv, a factored block's last conv (and its projection shortcut); [] for anything else."""
    if type(module) in (nn.Linear, nn.Conv2d):
        layers = [module]
    elif type(module) is LiResNetBlock:
        layers = [module.conv]
    elif type(module) is LinearBottleneck and type(module.branch[-1]) is nn.Conv2d:
        layers = [module.branch[-1]] + ([module.shortcut] if type(module.shortcut) is nn.Conv2d else [])
    else:
        return []
    return layers if all(_plain(layer) for layer in layers) else []


def _plain(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear or (layer.groups == 1 and layer.dilation == (1, 1) and
                                        layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` multiplies by its weight: ``x`` (dense) or its patches (conv), one row per output."""
    if type(layer) is nn.Linear:
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _regression(module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, targets) rows, such that the fitted layers' weights, stacked, map features to
    targets (features end with a constant 1 for the bias when the first layer has one)."""
    layers = _fitted_layers(module)
    if type(module) is LiResNetBlock:
        scale = (module.beta * module.scale).detach().view(1, -1, 1, 1)
        target, inputs = (target - x) / scale, [x]
    elif type(module) is LinearBottleneck:
        inputs = [module.branch[:-1](x)] + ([x] if len(layers) == 2 else [])
        if module.shortcut is None:
            target = target - x
        elif len(layers) == 1:
            target = target - module.shortcut(x)
    else:
        inputs = [x]
    rows = [_rows(layer, value) for layer, value in zip(layers, inputs)]
    if layers[0].bias is not None:
        rows.append(rows[0].new_ones(len(rows[0]), 1))
    goal = target.reshape(-1, target.shape[-1]) if type(layers[0]) is nn.Linear else \
        target.flatten(2).transpose(1, 2).reshape(-1, target.shape[1])
    return torch.cat(rows, 1).double(), goal.double()


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    scale = gram.diagonal().mean().clamp_min(1e-12)
    regularised = gram + ridge * scale * torch.eye(len(gram), dtype=gram.dtype)
    factor, info = torch.linalg.cholesky_ex(regularised)
    if info.item():
        return torch.linalg.lstsq(regularised, cross).solution
    return torch.cholesky_solve(cross, factor)


def _set_weights(module: nn.Module, solution: torch.Tensor) -> None:
    """Write the stacked solution back: each layer's weight block; the bias to the first layer
    (the others' biases, folded into it, become 0)."""
    layers, start = _fitted_layers(module), 0
    with torch.no_grad():
        for layer in layers:
            size = layer.weight[0].numel()
            layer.weight.copy_(solution[start:start + size].T.reshape(layer.weight.shape).to(layer.weight))
            start += size
        if layers[0].bias is not None:
            layers[0].bias.copy_(solution[start].to(layers[0].bias))
            for layer in layers[1:]:
                if layer.bias is not None:
                    layer.bias.zero_()


def _unchanged(layer: nn.Module, source: fx.GraphModule, node: fx.Node | None) -> bool:
    """``node`` of the source is a module of ``layer``'s type with the same weights: the converted
    layer still computes what the source's did (a pass that folded BatchNorm into it would not)."""
    if node is None or node.op != "call_module":
        return False
    original = source.get_submodule(node.target)
    return type(original) is type(layer) and all(
        (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))
        for a, b in ((layer.weight, original.weight), (layer.bias, original.bias)))


def _anchors(converted: fx.GraphModule, source: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Converted module nodes that compute a source node's value, in graph order: the module a
    rewrite recorded as the node's replacement, or a layer the conversion left as it was."""
    replaced = {r.replacement: r.node for r in rewrite_log(converted) if r.replacement}
    by_name = {n.name: n for n in source.graph.nodes}
    anchors = []
    for node in converted.graph.nodes:
        if node.op != "call_module":
            continue
        module = converted.get_submodule(node.target)
        layers = _fitted_layers(module)
        if not layers:
            continue
        name = replaced.get(node.target)
        if name is None and layers == [module] and _unchanged(module, source, by_name.get(node.name)):
            name = node.name
        if name is not None and name in by_name:
            anchors.append((node, name))
    return anchors


def _module_input(converted: fx.GraphModule, node: fx.Node, images: torch.Tensor, batch_size: int
                  ) -> Iterator[torch.Tensor]:
    """Per batch of ``images``: what ``node``'s module receives from the converted model."""
    seen: list[torch.Tensor] = []
    handle = converted.get_submodule(node.target).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            for batch in _batches(images, batch_size):
                converted(batch)
                yield seen.pop()
    finally:
        handle.remove()


@torch.no_grad()
def calibrate(converted: fx.GraphModule, source: nn.Module, images: torch.Tensor, *, ridge: float = 1e-3,
              batch_size: int = 128, progress: ProgressLike | None = None,
              on_fit: Callable[[BlockFit], None] | None = None) -> Calibration:
    """Refit ``converted`` (in place) to ``source`` on ``images``; see the module docstring.

    Args:
        converted: a model :func:`~certify_fx.convert` returned, before its weights are rescaled
            (``convert(..., calibration_data=images)`` runs this step at the right point).
        source: the model it was converted from (not modified; evaluated in eval mode on a copy's trace).
        images: a batch of inputs (no labels), e.g. a few hundred training images.
        ridge: Tikhonov regularisation, relative to the mean diagonal of each normal matrix.
        batch_size: images per forward.
        progress: a progress display to show one step per fitted layer on.
        on_fit: called with each fit as it is made.

    Returns:
        A :class:`Calibration`; the same numbers are appended to the model's ``rewrite_log``.
    """
    if images.ndim < 2 or len(images) == 0:
        raise CertifyFxError(f"calibrate needs a non-empty batch of inputs, got shape {tuple(images.shape)}")
    was_training = converted.training
    converted.eval()
    traced = trace(copy.deepcopy(source).eval())  # tracing may write into the module: a copy
    anchors = _anchors(converted, traced)
    output = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    targets_of = _source_values(traced, {name for _, name in anchors} | {output.name}, images, batch_size)
    reference = targets_of[output.name].argmax(-1)

    def agreement() -> float:
        predictions = torch.cat([converted(b).argmax(-1) for b in _batches(images, batch_size)])
        return (predictions == reference).double().mean().item()

    before = agreement()
    task = progress.add_task("calibrate", total=len(anchors), info="") if progress is not None else None
    fits = []
    for node, name in anchors:
        module = converted.get_submodule(node.target)
        targets = targets_of[name]
        if task is not None:
            progress.update(task, info=node.target)
        gram = cross = None
        residual = norm = 0.0
        for x, target in zip(_module_input(converted, node, images, batch_size), targets.split(batch_size)):
            output = module(x)
            if target.shape != output.shape:
                break
            residual += (output - target).double().square().sum().item()
            norm += target.double().square().sum().item()
            rows, goal = _regression(module, x, target)
            gram = rows.T @ rows if gram is None else gram + rows.T @ rows
            cross = rows.T @ goal if cross is None else cross + rows.T @ goal
        if gram is None or norm == 0 or residual <= 1e-12 * norm:
            continue  # nothing to fit (a layer the conversion kept, fed what the source fed it)
        _set_weights(module, _solve(gram, cross, ridge))
        after = sum((module(x) - t).double().square().sum().item()
                    for x, t in zip(_module_input(converted, node, images, batch_size), targets.split(batch_size)))
        fit = BlockFit(node.target, name, (residual / norm) ** 0.5, (after / norm) ** 0.5)
        fits.append(fit)
        log_rewrite(converted, _PASS, name, f"{node.target}: fit error {fit.error_before:.3f}",
                    f"fit error {fit.error_after:.3f}", True)
        if on_fit is not None:
            on_fit(fit)
        if task is not None:
            progress.advance(task)
    after = agreement()
    log_rewrite(converted, _PASS, "output", f"predicts the source's class on {before:.1%} of {len(images)} images",
                f"on {after:.1%} after fitting {len(fits)} layers", True)
    if task is not None:
        progress.remove_task(task)
    converted.train(was_training)
    return Calibration(fits, before, after, len(images))


def _source_values(traced: fx.GraphModule, names: set[str], images: torch.Tensor, batch_size: int
                   ) -> dict[str, torch.Tensor]:
    values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for batch in _batches(images, batch_size):
        probe = _Probe(traced, names)
        probe.run(batch)
        for name, value in probe.values.items():
            values[name].append(value)
    return {name: torch.cat(parts) for name, parts in values.items() if parts}
