"""Two moons with a known margin (CLL paper, Sec. 4.1 and App. B): scikit-learn's ``make_moons``
without noise, then each point moved uniformly within a disk of radius ``noise_radius``.

The noiseless moons are 0.5 apart at their closest, so with ``noise_radius=0.1`` the classes are
at least 0.3 apart: a classifier can be certified on every point at radius 0.15, no further.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from ..errors import CertifyFxError

__all__ = ["TWO_MOONS_GAP", "two_moons"]

#: The distance between the two noiseless moons at their closest.
TWO_MOONS_GAP = 0.5


def two_moons(size: int = 2000, noise_radius: float = 0.1, seed: int = 0) -> TensorDataset:
    """``size`` points ``(x in R^2, label in {0, 1})``, half per moon, as float32 tensors.

    Raises:
        CertifyFxError: scikit-learn is not installed (``pip install 'certify-fx[bench]'``).
    """
    try:
        from sklearn.datasets import make_moons
    except ModuleNotFoundError:
        raise CertifyFxError("two_moons needs scikit-learn: pip install 'certify-fx[bench]'") from None
    points, labels = make_moons(n_samples=size, noise=0.0, random_state=seed)
    gen = torch.Generator().manual_seed(seed)
    # sqrt of a uniform radius fraction: uniform over the disk's area, not crowded at its centre.
    radius = noise_radius * torch.rand(size, generator=gen, dtype=torch.float64).sqrt()
    angle = 2 * math.pi * torch.rand(size, generator=gen, dtype=torch.float64)
    offset = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    x = torch.as_tensor(points, dtype=torch.float64) + offset
    return TensorDataset(x.float(), torch.as_tensor(labels, dtype=torch.long))
