"""Atomic file writes: a crash or a kill leaves the previous file intact, never a half-written one."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_text"]


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name beside ``path``; renamed over ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)
