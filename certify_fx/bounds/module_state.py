"""A model's state around the compiler's own runs: what a forward writes, and undoing it.

Symbolic tracing calls ``forward`` with the user's modules as ``self``: an attribute assigned in
``forward`` then holds a ``torch.fx.Proxy`` (a cache filled on the first call), a counter is
incremented, and fx stores the tensor constants it meets as attributes of the root. The example
runs call ``forward`` for real. :class:`ModuleState` records every module's attributes, parameters,
buffers and submodules (tensors by value) so the compiler can name what a forward changed and put
it all back: bounding leaves the user's model exactly as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ModuleState", "unwrap_model"]

_REGISTRIES = ("_parameters", "_buffers", "_modules")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a known wrapper runs: ``torch.compile``'s, ``DataParallel``'s and
    ``DistributedDataParallel``'s (each computes exactly its inner module's function)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile keeps the compiled module here (no public accessor)
        else:
            return model


_PLAIN = (int, float, complex, bool, str, bytes, type(None))


def _plain_container(value: Any) -> bool:
    """A list, dict or set of plain values (a forward can change it in place)."""
    if isinstance(value, (list, set)):
        return all(isinstance(v, _PLAIN) or _plain_container(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(v, _PLAIN) or _plain_container(v) for v in value.values())
    return False


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value) if _plain_container(value) else value


def _put_back(container: Any, saved: Any) -> None:
    if isinstance(container, list):
        container[:] = copy.deepcopy(saved)
    else:  # dict or set
        container.clear()
        container.update(copy.deepcopy(saved))


def _unchanged(entry: _Entry, now: Any) -> bool:
    if now is not entry.original:
        return False
    if isinstance(now, (list, dict, set)) and entry.saved is not now:
        return now == entry.saved
    if not isinstance(now, torch.Tensor):
        return True
    saved, now = entry.saved, now.detach()
    return now.shape == saved.shape and now.dtype == saved.dtype and (
        torch.equal(now, saved) or (now.is_floating_point() and torch.allclose(now, saved, rtol=0, atol=0,
                                                                                equal_nan=True)))


@dataclass
class _Entry:
    original: Any  # the object the attribute held
    saved: Any  # its value then (a clone, for tensors)


#: an attribute: (the registry it lives in, or None for a plain attribute; its name)
_Key = tuple[str | None, str]


def _attributes(module: nn.Module) -> dict[_Key, Any]:
    found: dict[_Key, Any] = {}
    for key, value in vars(module).items():
        if key in _REGISTRIES:
            found.update({(key, name): item for name, item in value.items()})
        else:
            found[(None, key)] = value
    return found


class ModuleState:
    """Every module's attributes of ``model`` now (tensors by value), to compare with and restore."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[str, nn.Module]] = list(model.named_modules(remove_duplicate=False))
        self.entries: list[dict[_Key, _Entry]] = [
            {key: _Entry(value, _copy(value)) for key, value in _attributes(module).items()}
            for _, module in self.modules]

    def changes(self) -> list[str]:
        """``path.attribute`` of every attribute added, removed, reassigned or written in place since
        the snapshot."""
        found = []
        for (path, module), entries in zip(self.modules, self.entries):
            current = _attributes(module)
            for key in sorted(set(entries) | set(current), key=lambda k: (k[0] or "", k[1])):
                if key not in entries or key not in current or not _unchanged(entries[key], current[key]):
                    found.append(f"{path}.{key[1]}" if path else key[1])
        return found

    @torch.no_grad()
    def restore(self) -> None:
        """Put back every attribute as it was (tensors keep their identity and get their values back)."""
        for (_, module), entries in zip(self.modules, self.entries):
            attributes = vars(module)
            for key in [k for k in attributes if k not in _REGISTRIES and (None, k) not in entries]:
                del attributes[key]
            for registry in _REGISTRIES:
                attributes[registry].clear()
            for (registry, name), entry in entries.items():
                (attributes if registry is None else attributes[registry])[name] = entry.original
                if _unchanged(entry, entry.original):
                    continue
                if isinstance(entry.original, torch.Tensor):
                    entry.original.data = entry.saved.clone()
                else:
                    _put_back(entry.original, entry.saved)
