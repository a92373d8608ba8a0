"""Plain ConvNet baselines of the GloRo and CLL papers: 4C3F, 6C2F, 8C2F.

``c(C, K, S, P)`` is a conv with C channels, a K x K kernel, stride S and padding P; ``d(D)`` a dense
layer; every layer but the last is followed by MinMax (CLL App. B, Table B2). Registered with timm
as ``convnet_4c3f``, ``convnet_6c2f`` and ``convnet_8c2f``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..nn import LLNLinear, MinMax, Normalize
from ._classifier import TimmClassifier
from ._registry import register_family

__all__ = ["CONVNET_SPECS", "ConvNet"]

Conv = tuple[int, int, int, int]  # channels, kernel, stride, padding

#: Name -> (conv layers, hidden dense widths); the classifier layer is added for ``num_classes``.
CONVNET_SPECS: dict[str, tuple[list[Conv], list[int]]] = {
    "4c3f": ([(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512, 512]),
    "6c2f": ([(32, 3, 1, 1), (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512]),
    "8c2f": ([(64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 0), (128, 3, 1, 1), (128, 3, 1, 1), (128, 4, 2, 0),
              (256, 3, 1, 1), (256, 4, 2, 0)], [256]),
}


class ConvNet(TimmClassifier):
    """Convs and dense layers with MinMax between them, a (optionally LLN) linear classifier last.

    Args:
        convs: ``(channels, kernel, stride, padding)`` per conv layer.
        dense: hidden dense widths after flattening.
        num_classes, in_chans, img_size: output and input sizes.
        lln: normalise the classifier's rows (last-layer normalisation); GloRo uses a plain layer.
        mean, std: input normalisation (inside the model: certificates are in [0, 1] pixel space).
    """

    def __init__(self, convs: Sequence[Conv], dense: Sequence[int], num_classes: int = 10, in_chans: int = 3,
                 img_size: int = 32, lln: bool = False, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.normalize = Normalize(mean or [0.0] * in_chans, std or [1.0] * in_chans)
        layers: list[nn.Module] = []
        channels, size = in_chans, img_size
        for out, kernel, stride, padding in convs:
            layers += [nn.Conv2d(channels, out, kernel, stride, padding), MinMax()]
            channels, size = out, (size + 2 * padding - kernel) // stride + 1
        if size < 1:
            raise ValueError(f"img_size {img_size} is too small for these convolutions")
        layers.append(nn.Flatten())
        features = channels * size * size
        for width in dense:
            layers += [nn.Linear(features, width), MinMax()]
            features = width
        self.features = nn.Sequential(*layers)
        self._init_classifier((LLNLinear if lln else nn.Linear)(features, num_classes), (in_chans, img_size, img_size),
                              num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))


def _factory(spec: str):
    convs, dense = CONVNET_SPECS[spec]

    def build(**kwargs: Any) -> ConvNet:
        return ConvNet(convs, dense, **kwargs)

    return build


for _spec in CONVNET_SPECS:
    register_family(f"convnet_{_spec}", _factory(_spec), __name__, f"The {_spec.upper()} ConvNet baseline.")
