"""ATen ops read as the torch functions whose rules bound them (the ``torch.export`` path).

``torch.export`` records a model as ATen operators (``aten.conv2d.default``,
``aten.max.other``, ...). Most are the very op a torch function or Tensor method calls: PyTorch
generates ``torch.conv2d``, ``torch.max`` and ``Tensor.view`` from the same schemas, with the same
arguments in the same order. :func:`to_torch_forms` rewrites each such node into that function or
method, so the one rule table (:mod:`.registry`) bounds both capture paths; there is no second
table of rules.

Which form an ATen op is read as:

* a torch function or Tensor method generated from the schema (a builtin, in ``torch``,
  ``torch._C._nn`` or on ``Tensor``) whose rule exists: positional arguments are passed as they
  are, which is how that builtin itself binds them;
* a Python wrapper with a rule (``F.silu``, ``F.elu``) only when, at every position the call
  fills, the wrapper's parameter has the schema's name: a wrapper that orders its arguments
  otherwise is never bound by position;
* the few ops whose torch form reorders or renames their arguments (``batch_norm``,
  ``layer_norm``, ``slice``, ``select``, ``sym_size``) through :data:`ADAPTERS`.

An op with none of these stays an ATen node: it is computed where it is a constant of the graph
(a weight computed by FFT, QR or a matrix exponential), and refused, naming the node, the op and
the model's source line, where it carries the input. An op that writes into its arguments is
refused here already: the in-place check of :mod:`.dependence` knows the torch forms only.
"""

from __future__ import annotations

import inspect
import operator
import os
import sys
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import dependence, registry

__all__ = ["ADAPTERS", "torch_form", "to_torch_forms", "source_line", "is_aten"]

aten = torch.ops.aten


def is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def source_line(node: fx.Node) -> str | None:
    """``file:line (code)`` of the model code that produced ``node``: the innermost frame of its
    recorded stack outside torch itself (``torch.export`` and the tracer record stacks)."""
    lines = (node.meta.get("stack_trace") or "").splitlines()
    frames = [(i, line.strip()) for i, line in enumerate(lines) if line.strip().startswith("File ")]
    user = [(i, f) for i, f in frames if _TORCH_DIR not in f]
    if not user:
        return None
    i, frame = user[-1]
    parts = frame.split(",")  # File "path", line N, in fn
    path = parts[0][len("File "):].strip().strip('"')
    line = parts[1].strip().removeprefix("line ") if len(parts) > 1 else "?"
    code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("File ") else ""
    return f"{path}:{line} ({code})" if code else f"{path}:{line}"


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


# -- adapters: ATen ops whose torch form takes its arguments differently -------------------------
def _index(dim: int, item: Any) -> tuple:
    return (slice(None),) * dim + (item,) if dim >= 0 else (Ellipsis, item) + (slice(None),) * (-dim - 1)


def _slice(x, dim=0, start=None, end=None, step=1):
    whole = start in (None, 0) and (end is None or end >= sys.maxsize) and step in (None, 1)
    return (operator.getitem, (x, _index(dim, slice(None) if whole else slice(start, end, step))), {})


def _select(x, dim, index):
    return (operator.getitem, (x, _index(dim, index)), {})


def _sym_size(x, dim):
    return ("size", (x, dim), {})


def _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return (F.batch_norm, (x, running_mean, running_var, weight, bias, training, momentum, eps), {})


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return (F.layer_norm, (x, normalized_shape), {"weight": weight, "bias": bias, "eps": eps})


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return (F.group_norm, (x, num_groups, weight, bias, eps), {})


def _dropout(x, p, train):
    return (F.dropout, (x, p, train), {})


def _index_tensor(x, indices):
    return (operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices)), {})


def _alias(x):
    return (torch.clone, (x,), {})


def _feature_dropout(x, p, train):
    return (F.dropout2d, (x, p, train), {})


def _im2col(x, kernel_size, dilation, padding, stride):
    return (F.unfold, (x, kernel_size, dilation, padding, stride), {})


def _split_with_sizes(x, split_sizes, dim=0):
    return (torch.split, (x, split_sizes, dim), {})


def _max_pool2d_with_indices(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return (F.max_pool2d_with_indices, (x, kernel_size, stride or None, padding, dilation, ceil_mode), {})


def _adaptive_max_pool2d(x, output_size):
    return (F.adaptive_max_pool2d_with_indices, (x, output_size), {})


def _upsample(mode: str, align: bool):
    def adapter(x, output_size, *rest):
        align_corners, scale_factors = (rest[0], rest[1]) if align else (None, rest[0])
        return (F.interpolate, (x, output_size, scale_factors, mode, align_corners), {})

    return adapter


#: ATen ops whose torch form reorders, renames or drops arguments: each adapter takes the ATen
#: call's arguments (bound by the schema) and returns ``(target, args, kwargs)`` of the torch form.
#: ``cudnn_enabled`` is a backend hint that does not change the value computed.
ADAPTERS: dict[Any, Callable[..., tuple]] = {
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.sym_size.int: _sym_size,
    aten.batch_norm.default: _batch_norm,
    aten.layer_norm.default: _layer_norm,
    aten.group_norm.default: _group_norm,
    aten.dropout.default: _dropout,
    aten.alias.default: _alias,
    aten.index.Tensor: _index_tensor,
    aten.feature_dropout.default: _feature_dropout,
    aten.im2col.default: _im2col,
    aten.split_with_sizes.default: _split_with_sizes,
    aten.max_pool2d_with_indices.default: _max_pool2d_with_indices,
    aten.adaptive_max_pool2d.default: _adaptive_max_pool2d,
    aten.upsample_nearest2d.vec: _upsample("nearest", align=False),
    aten.upsample_bilinear2d.vec: _upsample("bilinear", align=True),
    aten.upsample_bicubic2d.vec: _upsample("bicubic", align=True),
}


# -- the generic reading: same schema, same positions ----------------------------------------------
def _schema_names(op: torch._ops.OpOverload) -> list[str]:
    return ["input" if a.name == "self" else a.name for a in op._schema.arguments if not a.kwarg_only]


def _matches_by_name(fn: Callable, names: list[str], used: int) -> bool:
    """Whether the Python function ``fn`` takes the schema's first ``used`` arguments at the same
    positions, by name (the tensor an op is called on, ``self`` in the schema, may have any name:
    ``Tensor.split(self, ...)``, ``torch.functional.split(tensor, ...)``)."""
    try:
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    if params and names and names[0] == "input":
        params[0] = "input"
    return len(params) >= used and params[:used] == names[:used]


def _candidates(name: str) -> list[tuple[str, Any]]:
    found = []
    for namespace in (torch, torch._C._nn, F):
        fn = getattr(namespace, name, None)
        if fn is not None:
            found.append(("call_function", fn))
    if name.startswith("fft_") and hasattr(torch.fft, name[4:]):  # aten.fft_rfft2 is torch.fft.rfft2
        found.append(("call_function", getattr(torch.fft, name[4:])))
    if callable(getattr(torch.Tensor, name, None)):
        found.append(("call_method", name))
    return found


def _understood(kind: str, target: Any) -> bool:
    """Whether the compiler reads ``target``: a rule bounds it, or the dataflow analysis knows it
    as a constructor of constant rows (``torch.zeros(batch, ...)``) or a read of a shape."""
    if registry.lookup(kind, target) is not None:
        return True
    try:
        return target in dependence.BROADCAST_CONSTRUCTORS or target in dependence.SHAPE_ONLY_ARGUMENTS
    except TypeError:  # unhashable
        return False


def torch_form(op: torch._ops.OpOverload, used: int) -> tuple[str, Any] | None:
    """``(node op, target)`` of the torch function or Tensor method that ``op`` is, called with its
    first ``used`` schema arguments by position, if the compiler reads that form (a rule, or the
    dataflow analysis)."""
    name = op._schema.name.split("::")[-1]
    names = _schema_names(op)
    for kind, target in _candidates(name):
        if not _understood(kind, target):
            continue
        fn = getattr(torch.Tensor, target) if kind == "call_method" else target
        if inspect.isbuiltin(fn) or type(fn).__name__ == "method_descriptor" or _matches_by_name(fn, names, used):
            return kind, target
    return None


def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments by schema: positional ones in schema order (trailing defaults left
    out), keyword-only ones by name."""
    schema = op._schema.arguments
    positional, keywords = list(args), {}
    for arg in schema[len(args):]:
        if arg.name in kwargs:
            if arg.kwarg_only:
                keywords[arg.name] = kwargs[arg.name]
            else:
                positional.append(kwargs[arg.name])
        elif not arg.kwarg_only and any(a.name in kwargs for a in schema if not a.kwarg_only
                                        and schema.index(a) > schema.index(arg)):
            positional.append(arg.default_value)  # a later positional argument was given by name
    return tuple(positional), keywords


def _mutates(op: torch._ops.OpOverload) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def to_torch_forms(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    """Rewrite every ATen node of ``gm`` that is a torch function or method with a rule into that
    form (see the module docstring). Returns the ATen nodes left (no rule reads them) and, among
    them, those whose op writes into an argument: an in-place op is kept only as the in-place
    torch form (``relu_``, ``add_``) whose writes the in-place check follows."""
    left, writing = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not is_aten(node.target):
            continue
        op = node.target
        args, kwargs = _bind(op, node.args, node.kwargs)
        if op in ADAPTERS:
            target, args, kwargs = ADAPTERS[op](*args, **kwargs)
            kind = "call_method" if isinstance(target, str) else "call_function"
        else:
            form = torch_form(op, len(args))
            in_place_form = form is not None and _name(form[1]).endswith("_")
            if form is None or (_mutates(op) and not in_place_form):
                left.append(node)
                if _mutates(op):
                    writing.append(node)
                continue
            kind, target = form
        node.op, node.target, node.args, node.kwargs = kind, target, args, kwargs
    gm.graph.lint()
    gm.recompile()
    return left, writing


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")
