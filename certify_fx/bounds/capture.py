"""Capture: a model as a torch.fx graph the compiler can read, and errors that name its nodes.

The tracer keeps as leaves every module type the bound compiler has a rule for (the rule table,
:mod:`.registry`, is the one place that knows) and timm's "no-trace" modules (timm marks the
modules and functions that symbolic tracing cannot go through), turns tracing failures into a
:class:`~certify_fx.errors.TraceError` that says what to do, and leaves the user's model exactly as
it was (:mod:`.module_state`): tracing runs ``forward`` on the user's modules.
"""


from __future__ import annotations

from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .. import timm_layers
from ..errors import CertifyFxError, TraceError, UnsupportedNodeError
from . import aten, registry
from .module_state import ModuleState, unwrap_model

__all__ = ["CAPTURE_MODES", "CaptureMode", "CertifyTracer", "trace", "export_graph", "capture", "configured_input_shape",
           "example_input", "describe_node", "node_error"]

#: how :func:`capture` builds the graph: symbolic tracing where it works, else ``torch.export``
#: (``"auto"``); only one of them (``"symbolic"``, ``"export"``)
CAPTURE_MODES = ("auto", "symbolic", "export")
CaptureMode = Literal["auto", "symbolic", "export"]


class CertifyTracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are the modules with a bound rule and timm's no-trace modules."""

    def __init__(self, extra_leaves: tuple[type[nn.Module], ...] = ()) -> None:
        self._timm_leaves = timm_layers.notrace_modules()
        super().__init__(autowrap_functions=timm_layers.notrace_functions())
        self.record_stack_traces = False  # 0.2 s on the first trace of a process; torch.export records source lines
        self._extra_leaves = extra_leaves
        self.failed_in: tuple[str, nn.Module] | None = None

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module whose forward failed
                try:
                    path = self.path_of_module(m)
                except NameError:  # a module built inside forward: it has no path in the model
                    path = f"<{type(m).__name__} created in forward>"
                self.failed_in = (path, m)
            raise

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._extra_leaves) or type(m) in self._timm_leaves or registry.module_rule(m) is not None:
            return True
        if registry.registered_base(m) is not None:
            return False  # a rule's type whose instance or subclass changes a method: trace what it computes
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, extra_leaves: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule (returned as is if it already is one; a
    ``torch.compile`` or ``DataParallel`` wrapper is traced as the module it runs)."""
    model = unwrap_model(model)
    if isinstance(model, fx.GraphModule):
        return model
    tracer = CertifyTracer(extra_leaves)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types; report one clear error
        raise TraceError(_trace_failure(model, tracer.failed_in, exc)) from exc
    name = type(model).__name__
    return fx.GraphModule(model, graph, class_name=name)


def _trace_failure(model: nn.Module, failed_in: tuple[str, nn.Module] | None, exc: Exception) -> str:
    where = ""
    if failed_in is not None:
        path, module = failed_in
        where = f" in node '{path}' ({type(module).__qualname__})"
    message = (f"torch.fx could not trace {type(model).__name__}{where}: {type(exc).__name__}: {exc}. Symbolic "
               "tracing runs forward on placeholders, so Python that needs a real value fails there (if/for on a "
               "tensor, float(), int() or len() of a tensor or of its size, a size passed to a Python function); "
               "rewrite it with tensor ops, or move it into a leaf module")
    if failed_in is not None:
        cls = type(failed_in[1])
        base = next((b for b in cls.__mro__[1:] if b in registry.MODULE_RULES), None)
        if base is not None:
            message += (f". {cls.__qualname__} subclasses {base.__qualname__} and changes a method, so the rule for "
                        f"{base.__qualname__} does not cover it and its forward was traced; if it computes a map you "
                        "can bound, register a rule for it with certify_fx.register_module_rule")
    return message


def configured_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape a model declares: a converted model's ``input_shape`` or timm's config."""
    if getattr(model, "input_shape", None):
        return tuple(model.input_shape)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg["input_size"]) if "input_size" in cfg else None


def example_input(input_shape: tuple[int, ...], batch: int = 2, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """A deterministic example batch used to propagate shapes."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, *input_shape, generator=generator, dtype=dtype).to(device)


#: nodes ``torch.export`` adds that check its own shape guards; the example runs check the shape
_GUARD_TARGETS = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default,
                  torch.ops.aten._assert_tensor_metadata.default}


def export_graph(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """``model`` captured by ``torch.export`` at ``input_shape`` (any batch size), its ATen ops read
    as the torch functions whose rules bound them (:mod:`.aten`).

    ``torch.export`` runs the model's Python for real (loops over weights, ``len(x.shape)``,
    ``x.shape[0]``) and records the tensor ops, with parameters and buffers as graph constants
    and a stack trace per node. The graph reads the model's own parameters (not copies), so a
    compiler built on it follows the weights as they train.
    """
    params = next(iter(model.parameters()), None)
    dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
    device = params.device if params is not None else "cpu"
    x = example_input(tuple(input_shape), 2, dtype, device)
    batch = torch.export.Dim("batch")
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # export raises many types; report one clear error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {first}. "
                         "torch.export runs forward on an example input and fails on Python that needs an input "
                         "value (if/for on a tensor's values, .item(), a size that depends on the batch in a way it "
                         "cannot express)") from exc
    unlifted = program.module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in unlifted.graph.nodes:
        if node.op == "call_module" or (node.op == "call_function" and node.target in _GUARD_TARGETS):
            continue  # the guard module and assertions on sizes: checked by the example runs instead
        if node.op == "output":
            flat = [env[n] if isinstance(n, fx.Node) else n for n in pytree.tree_leaves(node.args[0])]
            graph.output(pytree.tree_unflatten(flat, program.call_spec.out_spec))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    root = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            root[node.target] = _attribute(model, node.target, unlifted)
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    _, writing = aten.to_torch_forms(gm)
    for node in writing:
        raise node_error(gm, node, "writes into one of its arguments, in a form the in-place check cannot follow",
                         "use the out-of-place op (x = x + y, torch.relu(x))")
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            raise node_error(gm, node, f"{node.target.name()} (a control-flow or grad-mode region) has no rule",
                             "remove torch.no_grad()/torch.cond from forward (compute constants outside it)")
    return gm


def _attribute(model: nn.Module, target: str, fallback: nn.Module) -> Any:
    """``model``'s own parameter or buffer at ``target``; export's copy for its lifted constants."""
    for owner in (model, fallback):
        value = owner
        try:
            for part in target.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    raise CertifyFxError(f"torch.export's graph reads '{target}', which neither the model nor the export holds")


def capture(model: nn.Module, input_shape: tuple[int, ...] | None = None,
            mode: CaptureMode = "auto") -> fx.GraphModule:
    """``model`` as a GraphModule (returned as is if it already is one), and put back whatever
    capturing wrote into it (a forward that assigns an attribute leaves a ``torch.fx.Proxy`` there;
    fx stores tensor constants on the root).

    ``mode`` ``"auto"`` traces symbolically and, where that fails, captures with ``torch.export``
    at ``input_shape``; ``"symbolic"`` and ``"export"`` take only that path.
    """
    if mode not in CAPTURE_MODES:
        raise CertifyFxError(f"capture must be one of {', '.join(CAPTURE_MODES)}; got {mode!r}")
    if isinstance(model, fx.GraphModule):
        return model
    if mode == "export" and input_shape is None:
        raise CertifyFxError("capture='export' needs the input shape")
    state = ModuleState(model)
    try:
        if mode == "export":
            return export_graph(model, input_shape)
        try:
            return trace(model)
        except TraceError as symbolic_error:
            if mode == "symbolic":
                raise TraceError(f"{symbolic_error}; or let torch.export capture it (capture='auto' or 'export'; "
                                 "CLI: --capture auto)") from symbolic_error
            if input_shape is None:
                raise
            state.restore()  # what the failed trace wrote into the model
            try:
                return export_graph(model, input_shape)
            except TraceError as export_error:
                raise TraceError(f"{symbolic_error}\n{export_error}") from export_error
    finally:
        state.restore()


def describe_node(node: fx.Node, gm: fx.GraphModule) -> str:
    """The node's operation and, for functions, the module whose forward called it."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} ({node.target})"
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if node.op == "call_method":
        name = f"Tensor.{node.target}"
    else:
        name = str(node.target) if aten.is_aten(node.target) else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls = getattr(cls, "__name__", cls)
        name = f"{name} in {cls.rsplit('.', 1)[-1] if isinstance(cls, str) else cls} ({path})"
    line = aten.source_line(node)
    return f"{name} at {line}" if line else name


def node_error(gm: fx.GraphModule, node: fx.Node | None, reason: str, fix: str | None = None,
                error: type[UnsupportedNodeError] = UnsupportedNodeError) -> UnsupportedNodeError:
    if node is None:
        return error("<model>", type(gm).__name__, reason, fix)
    return error(node.name, describe_node(node, gm), reason, fix)


