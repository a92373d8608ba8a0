"""What a bound was proven for: a model's structure and the exact values of its weights.

A :class:`~certify_fx.bounds.compiler.LipschitzBound` records the fingerprint of the model it was
computed for; certification refuses a bound whose fingerprint no longer matches (weights written
through ``.data``, a replaced submodule, a changed constant attribute, a module switched to
training mode, a hook added).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from .module_state import unwrap_model

__all__ = ["Fingerprint", "model_fingerprint"]

_PLAIN = (int, float, bool, str, type(None))


@dataclass(frozen=True)
class Fingerprint:
    """``structure`` covers module and tensor identities, types, names, hooks and plain attributes
    (what a traced graph holds or bakes in); ``mode`` the train/eval flags; ``weights`` the bytes of every parameter, buffer and
    tensor attribute (0 when not computed)."""

    structure: int
    mode: int
    weights: int

    def __str__(self) -> str:
        return f"{self.structure:08x}-{self.mode:08x}-{self.weights:08x}"


def _tensor_crc(t: torch.Tensor, crc: int) -> int:
    data = t.detach().reshape(-1).contiguous()
    if data.numel():
        crc = zlib.crc32(data.view(torch.uint8).cpu().numpy(), crc)  # reads the buffer, no copy
    return zlib.crc32(f"{tuple(t.shape)}{t.dtype}".encode(), crc)


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def model_fingerprint(model: nn.Module, weights: bool = True) -> Fingerprint:
    """The fingerprint of ``model`` now (one pass over its weights: cheap next to a forward pass);
    ``weights=False`` skips the weights (for checking the structure only). A known wrapper
    (``torch.compile``, ``DataParallel``) has its inner module's fingerprint."""
    model = unwrap_model(model)
    structure, mode, crc = 0, 0, 0
    for name, module in model.named_modules():
        hooks = (len(getattr(module, "_forward_hooks", ())), len(getattr(module, "_forward_pre_hooks", ())))
        attributes = sorted((k, repr(v)) for k, v in vars(module).items()
                            if not k.startswith("_") and k != "training" and _plain(v))
        # identity too: a traced graph holds the module objects it was traced with
        structure = zlib.crc32(f"{name}|{type(module).__qualname__}|{id(module)}|{hooks}|{attributes}".encode(),
                               structure)
        mode = zlib.crc32(f"{name}|{module.training}".encode(), mode)
        tensors = {**module._parameters, **module._buffers,  # noqa: SLF001 - torch's own registries
                   **{k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}}
        for key in sorted(tensors):
            value = tensors[key]
            structure = zlib.crc32(f"{name}.{key}:{id(value)}".encode(), structure)
            if value is not None and weights:
                crc = _tensor_crc(value, crc)
    return Fingerprint(structure, mode, crc)
