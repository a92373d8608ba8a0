"""Capture: a model as a torch.fx graph the compiler can read, and errors that name its nodes.

The tracer keeps as leaves every module type the bound compiler has a rule for (the rule table,
:mod:`.registry`, is the one place that knows) and timm's "no-trace" modules (timm marks the
modules and functions that symbolic tracing cannot go through), turns tracing failures into a
:class:`~certify_fx.errors.TraceError` that says what to do, and leaves the user's model exactly as
it was (:mod:`.module_state`): tracing runs ``forward`` on the user's modules.
"""


from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import timm_layers
from ..errors import TraceError, UnsupportedNodeError
from . import registry
from .module_state import ModuleState, unwrap_model

__all__ = ["CertifyTracer", "trace", "capture", "configured_input_shape", "example_input", "describe_node", "node_error"]


class CertifyTracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are the modules with a bound rule and timm's no-trace modules."""

    def __init__(self, extra_leaves: tuple[type[nn.Module], ...] = ()) -> None:
        self._timm_leaves = timm_layers.notrace_modules()
        super().__init__(autowrap_functions=timm_layers.notrace_functions())
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


def capture(model: nn.Module) -> fx.GraphModule:
    """``model`` as a GraphModule (returned as is if it already is one): traced, and put back whatever tracing wrote into it (a forward that assigns an
    attribute leaves a ``torch.fx.Proxy`` there; fx stores tensor constants on the root)."""
    if isinstance(model, fx.GraphModule):
        return model
    state = ModuleState(model)
    try:
        return trace(model)
    finally:
        state.restore()


def describe_node(node: fx.Node, gm: fx.GraphModule) -> str:
    """The node's operation and, for functions, the module whose forward called it."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} ({node.target})"
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    name = f"Tensor.{node.target}" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        return f"{name} in {getattr(cls, '__name__', cls)} ({path})"
    return name


def node_error(gm: fx.GraphModule, node: fx.Node | None, reason: str, fix: str | None = None,
                error: type[UnsupportedNodeError] = UnsupportedNodeError) -> UnsupportedNodeError:
    if node is None:
        return error("<model>", type(gm).__name__, reason, fix)
    return error(node.name, describe_node(node, gm), reason, fix)


