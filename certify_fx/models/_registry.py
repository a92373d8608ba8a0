"""Registering certify-fx model families with timm (``timm.create_model(name, num_classes=...)``)."""

from __future__ import annotations

from typing import Any, Callable

from timm.models import register_model
from torch import nn

# timm passes these to every entrypoint; our models take none of them.
_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "drop_rate", "drop_path_rate", "global_pool")


def register_family(name: str, build: Callable[..., nn.Module], module: str, doc: str) -> None:
    """Register ``build(**kwargs)`` as the timm model ``name`` (no pretrained weights exist)."""

    def factory(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"certify-fx ships no pretrained weights for {name}; train one with `certify-fx train`")
        for key in _TIMM_KWARGS:
            kwargs.pop(key, None)
        return build(**kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__module__ = module
    register_model(factory)
