"""timm's ``pretrained_cfg`` for certify-fx models: the data pipeline must feed [0, 1] pixels.

A certificate is stated for the tensors the model receives. Every certify-fx model normalises
inside itself (:class:`certify_fx.nn.Normalize`, folded into the bound), so the inputs the radii
are measured in are plain ``[0, 1]`` pixels. timm's standard pipeline,
``create_transform(**resolve_data_config({}, model=m))``, normalises with the model's
``pretrained_cfg`` mean and std (ImageNet's when absent); this configuration makes that a no-op
(mean 0, std 1) and resizes nothing (``crop_pct`` 1), so a timm-built pipeline yields exactly the
inputs the recipes certify.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["pixel_space_cfg"]


def pixel_space_cfg(input_shape: Sequence[int], num_classes: int, classifier: str = "head",
                    **extra: Any) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` for a model that takes ``input_shape`` ``[0, 1]`` pixels."""
    channels = int(input_shape[0])
    return {
        "input_size": tuple(int(s) for s in input_shape),
        "num_classes": int(num_classes),
        "mean": (0.0,) * channels,
        "std": (1.0,) * channels,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "classifier": classifier,
        **extra,
    }
