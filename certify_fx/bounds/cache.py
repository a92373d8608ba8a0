"""Proven operator norms kept for the next bound that meets the same operator.

The expensive factors of a bound are the proven norms of wide convolutions and dense layers.
Each is a function of the operator alone (its type, geometry and kernel), so it is kept under a
BLAKE2 digest of exactly those (:func:`operator_key`), in memory and in a directory
(``$CERTIFY_FX_CACHE``, default ``~/.cache/certify-fx/norms``; ``CERTIFY_FX_CACHE=off`` keeps them
in memory only). Bounding the same weights again (certifying at another ``eps``, ``certify``
after ``bound``, ``certify-fx bound`` after ``certify-fx convert``, a model whose head alone
changed) traces and checks the model as always, and reads those norms back instead of proving
them again. Nothing but the norm of an operator identified by its full content is reused: what
the model computes is derived afresh every time.

Only proven, finite norms are kept; an entry names the digest it was stored under and the
algorithm version (:data:`BOUND_VERSION`) that proved it, and anything else is ignored. The
directory is the user's own, like pip's or torch's caches: whoever can write into it can write
into the installed package too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from .norms import NormBound
from .operators import Conv2d, Dense, LinearOperator, TransposedConv2d

__all__ = ["BOUND_VERSION", "NormCache", "cache_directory", "norm_cache", "operator_key"]

#: the version of the norm algorithms; an entry proved by another version is not read
BOUND_VERSION = 2
#: operators with fewer kernel entries are bounded again rather than looked up (it is as fast)
MIN_ENTRIES = 2**14
#: entries kept per shard of the directory (the first two hex digits of the key: 256 shards)
SHARD_ENTRIES = 64
_ENVIRONMENT = "CERTIFY_FX_CACHE"


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    data = t.detach().reshape(-1).contiguous().cpu()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if data.numel():
        h.update(data.view(torch.uint8).numpy())


def operator_key(op: LinearOperator) -> str | None:
    """The digest an operator's norm is kept under (type, geometry, kernel), or None for operators
    too small to be worth keeping."""
    if isinstance(op, TransposedConv2d):  # the same norm as its conv
        op = op.conv
    if isinstance(op, Conv2d):
        meta = ("conv2d", tuple(op.in_shape), tuple(op.stride), tuple(op.padding), tuple(op.dilation), op.groups)
    elif isinstance(op, Dense):
        meta = ("dense", tuple(op.in_shape))
    else:
        return None
    if op.weight.numel() < MIN_ENTRIES:
        return None
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{BOUND_VERSION}|{meta}|".encode())
    _hash_tensor(h, op.weight)
    return h.hexdigest()


def cache_directory() -> Path | None:
    """Where norms are kept between processes (``$CERTIFY_FX_CACHE``), or None when it is ``off``."""
    value = os.environ.get(_ENVIRONMENT)
    if value is not None and value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    try:
        if value:
            return Path(value).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home directory to expand: keep norms in memory only
        return None
    return Path(base) / "certify-fx" / "norms"


class NormCache:
    """Proven operator norms by :func:`operator_key`, in memory (the newest ``capacity``) and on disk."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._memory: OrderedDict[str, NormBound] = OrderedDict()

    def clear(self) -> None:
        """Forget what this process holds (the directory is left as it is)."""
        self._memory.clear()

    def upper_bound(self, op: LinearOperator, compute: Callable[[], NormBound] | None = None) -> NormBound:
        """``op``'s proven norm: kept, or computed (``compute``, default ``op.upper_bound``) and kept."""
        compute = compute or op.upper_bound
        key = operator_key(op)
        if key is None:
            return compute()
        found = self._memory.get(key) or self._read(key)
        if found is not None:
            self._remember(key, found)
            return found
        bound = compute()
        if bound.sound and math.isfinite(bound.value):
            self._remember(key, bound)
            self._write(key, bound)
        return bound

    def _remember(self, key: str, bound: NormBound) -> None:
        self._memory[key] = bound
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    @staticmethod
    def _path(key: str) -> Path | None:
        directory = cache_directory()
        return None if directory is None else directory / key[:2] / f"{key}.json"

    def _read(self, key: str) -> NormBound | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            value = float(entry["value"])
            if entry.get("key") != key or entry.get("version") != BOUND_VERSION or entry.get("sound") is not True:
                return None
            if not math.isfinite(value) or value < 0:
                return None
            return NormBound(value, True, f"{entry['method']} (kept)")
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: prove it again

    def _write(self, key: str, bound: NormBound) -> None:
        path = self._path(key)
        if path is None:
            return
        entry = {"key": key, "version": BOUND_VERSION, "value": bound.value, "sound": True,
                 "method": bound.method.removesuffix(" (kept)")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
                json.dump(entry, f)
            os.replace(f.name, path)  # atomic: a reader sees the whole entry or none
            _prune(path.parent)
        except OSError:
            pass  # a read-only or full disk costs a proof next time, nothing else


def _prune(shard: Path) -> None:
    """Keep the newest :data:`SHARD_ENTRIES` entries of a shard (training writes new weights' norms
    every epoch; the directory stays below 256 shards of that many small files)."""
    entries = sorted(shard.glob("*.json"), key=lambda p: p.stat().st_mtime)
    for old in entries[:-SHARD_ENTRIES]:
        old.unlink(missing_ok=True)


#: the process's norm cache (the bound compiler reads and fills it)
norm_cache = NormCache()
