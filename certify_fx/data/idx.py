"""Reading IDX files, the format of (Fashion-)MNIST, gzipped or not."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

# IDX type codes -> numpy dtypes (big-endian on disk)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> torch.Tensor:
    """The array stored in an IDX file (``.gz`` is decompressed on the fly)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {array.size} values")
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True).reshape(dims))
