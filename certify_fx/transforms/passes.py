"""The conversion passes as a table, and the runner that applies them in order.

A pass is a function ``body(gm, input_shape, **parameters)`` registered with
:func:`conversion_pass`, which declares what the runner needs to know about it: whether it may
change the function (exact passes only fold), the user options it reads (:class:`Option`: name,
default, allowed values, the pass's parameter), the passes that must run before it, and the
option that switches it on (``rescale``). From that table come :data:`CONVERT_OPTIONS` (what
``convert`` and a recipe's ``model.convert_options`` accept), the recorded conversion, and the
CLI's choices (a test ties them together).

The runner owns what every pass used to repeat: shapes are annotated once before each pass (two
example forwards; a pass used to annotate on entry and again on exit), the graph is finalised
after each pass (dead code, unused submodules, recompile), and progress shows the pass that runs. A pass still re-annotates inside its own loop when its next match depends on
the rewrite it just made. Called directly, a registered pass annotates and finalises itself, so
``fold_batchnorm(gm, shape)`` works on its own as before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch.fx as fx

from ..errors import ConversionOptionError
from .graph import annotate_shapes, finalize

if TYPE_CHECKING:
    from ..progress import ProgressLike

__all__ = ["ConversionPass", "Option", "PASSES", "check_order", "conversion_pass", "options_of", "resolve_options",
           "run_passes"]


@dataclass(frozen=True)
class Option:
    """A user-facing conversion option (``convert(..., name=value)``, ``--name``, recipes).

    Attributes:
        name: the keyword users pass.
        default: its value when not given.
        choices: the allowed values (None for a boolean switch).
        help: one line for ``--help`` and the docs.
        structural: False for a switch that only sets weight values (``rescale``): a model rebuilt
            to load saved weights into runs without it.
    """

    name: str
    default: Any
    choices: tuple[Any, ...] | None = None
    help: str = ""
    structural: bool = True

    def check(self, value: Any) -> Any:
        allowed = self.choices if self.choices is not None else (True, False)
        if value not in allowed or (self.choices is None and not isinstance(value, bool)):
            raise ConversionOptionError(f"conversion option {self.name}={value!r} is not one of "
                                 f"{', '.join(map(repr, allowed))}")
        return value


@dataclass(frozen=True)
class ConversionPass:
    """A registered pass and what the runner knows about it."""

    name: str
    body: Callable[..., fx.GraphModule]
    changes_function: bool
    parameters: Mapping[str, Option] = field(default_factory=dict)  #: the pass's keyword -> the option it reads
    after: tuple[str, ...] = ()  #: passes that must come first when a pipeline holds both
    enabled_by: Option | None = None  #: a boolean option that switches the pass on

    def keywords(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The pass's keyword arguments for the resolved ``options``."""
        return {parameter: options[option.name] for parameter, option in self.parameters.items()}


#: every registered pass, by name
PASSES: dict[str, ConversionPass] = {}


def conversion_pass(*, changes_function: bool, parameters: Mapping[str, Option] | None = None,
                    after: Iterable[str] = (), enabled_by: Option | None = None) -> Callable:
    """Register the decorated ``body(gm, input_shape, **parameters)`` as a pass named after it.

    Returns a function that runs the pass on its own (annotating shapes first and finalising
    after); the runner calls ``body`` directly.
    """

    def register(body: Callable[..., fx.GraphModule]) -> Callable[..., fx.GraphModule]:
        name = body.__name__
        if name in PASSES:
            raise ConversionOptionError(f"a conversion pass named {name!r} is already registered")
        PASSES[name] = ConversionPass(name, body, changes_function, dict(parameters or {}), tuple(after), enabled_by)

        @functools.wraps(body)
        def standalone(gm: fx.GraphModule, input_shape: tuple[int, ...], **keywords: Any) -> fx.GraphModule:
            annotate_shapes(gm, input_shape)
            gm = body(gm, input_shape, **keywords)
            finalize(gm)
            annotate_shapes(gm, input_shape)
            return gm

        standalone.conversion_pass = PASSES[name]
        return standalone

    return register


def options_of(passes: Iterable[ConversionPass]) -> dict[str, Option]:
    """Every option the ``passes`` read or are switched by, by name (each declared once)."""
    found: dict[str, Option] = {}
    for p in passes:
        for option in [*p.parameters.values(), *([p.enabled_by] if p.enabled_by else [])]:
            if found.setdefault(option.name, option) is not option:
                raise ConversionOptionError(f"two different conversion options are named {option.name!r}")
    return found


def resolve_options(given: Mapping[str, Any], allowed: Mapping[str, Option]) -> dict[str, Any]:
    """``given`` checked against ``allowed``, with every default filled in (in table order)."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConversionOptionError(f"unknown conversion option {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return {name: option.check(given[name]) if name in given else option.default for name, option in allowed.items()}


def check_order(names: Iterable[str]) -> list[ConversionPass]:
    """The passes ``names`` names, after checking each comes after the passes it must follow."""
    names = list(names)
    for i, name in enumerate(names):
        if name not in PASSES:
            raise ConversionOptionError(f"no conversion pass named {name!r}; registered: {', '.join(PASSES)}")
        late = [first for first in PASSES[name].after if first in names[i + 1:]]
        if late:
            raise ConversionOptionError(f"pass {name!r} must run after {late[0]!r}")
    return [PASSES[name] for name in names]


def run_passes(gm: fx.GraphModule, names: Iterable[str], input_shape: tuple[int, ...], options: Mapping[str, Any],
               progress: ProgressLike | None = None, task: Any = None) -> fx.GraphModule:
    """Apply the passes ``names`` in order with the resolved ``options`` (see the module docstring);
    a pass whose ``enabled_by`` option is False is skipped. ``task``: a progress task to advance
    once per pass."""
    for p in check_order(names):
        if p.enabled_by is not None and not options[p.enabled_by.name]:
            continue
        if task is not None:
            progress.update(task, info=p.name)
        annotate_shapes(gm, input_shape)
        gm = p.body(gm, input_shape, **p.keywords(options))
        finalize(gm)
        if task is not None:
            progress.advance(task)
    annotate_shapes(gm, input_shape)
    return gm
