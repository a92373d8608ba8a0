"""Reading weight files safely: ``torch.load(weights_only=True)`` or safetensors, never pickled code.

Every file certify-fx reads goes through :func:`read_torch_file` (one place that turns torch's
many failure modes into one clear :class:`~certify_fx.errors.CheckpointError`), and every set of
source weights through :func:`load_weights`: a certify-fx training checkpoint, a converted model,
a plain ``state_dict`` (``.pt``/``.pth``, optionally under a ``state_dict``/``model`` key, as many
training scripts save it) or a ``.safetensors`` file, loaded strictly.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError
from .files import atomic_torch_save, atomic_write

#: The metadata key under which certify-fx keeps its (JSON) records in a .safetensors file.
_SAFETENSORS_KEY = "certify_fx"

__all__ = ["CHECKPOINT_FORMAT", "CONVERTED_FORMAT", "load_weights", "read_payload", "read_safetensors",
           "read_state_dict", "read_torch_file", "save_payload", "save_safetensors"]

CHECKPOINT_FORMAT = "certify-fx/checkpoint"
CONVERTED_FORMAT = "certify-fx/converted"
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors that say what the file is.

    Raises:
        CheckpointError: missing file, a pickled Python object (not loaded: unpickling can run
            code), or a file that is not a readable torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle of objects: garbage, or another format
            kind = "a zip archive torch cannot read" if zipfile.is_zipfile(path) else "neither a torch zip archive nor a pickle"
            raise CheckpointError(f"{path} is not a readable torch file: corrupt, truncated or another format "
                                  f"({kind})") from None
        what = f" ({found.group(1)})"
        raise CheckpointError(
            f"{path} holds a pickled Python object{what}, which certify-fx does not load: unpickling can run "
            "code. Save tensors instead, e.g. torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError,
            IndexError, TypeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{path} is not a readable torch file: corrupt, truncated or another format "
                              f"({type(exc).__name__}: {detail})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in obj.items())


def _under_key(payload: Any, key: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict ``payload`` holds under ``key``: an entry (``{"backbone": {...}}``, nested
    entries as ``a/b``), or the parameters whose names start with ``key.`` (prefix removed)."""
    found = payload
    for part in key.split("/"):
        found = found.get(part) if isinstance(found, dict) else None
    if _is_state_dict(found):
        return found
    try:
        flat = read_state_dict_from(payload, path)
    except CheckpointError:  # no single state_dict in the file: only entries can match
        flat = {}
    prefixed = {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
    if prefixed:
        return prefixed
    entries = sorted(k for k, v in payload.items() if isinstance(v, dict)) if isinstance(payload, dict) else []
    prefixes = sorted({k.split(".", 1)[0] for k in flat if "." in k})
    raise CheckpointError(f"{path} has no weights under {key!r}; its entries holding mappings: "
                          f"{', '.join(entries) or 'none'}; parameter name prefixes: {', '.join(prefixes[:12]) or 'none'}")


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The model weights held by ``path``, whatever certify-fx or common training script wrote it;
    with ``key``, those under that entry or name prefix (see :func:`load_weights`)."""
    payload = read_payload(path)
    return _under_key(payload, key, path) if key else read_state_dict_from(payload, path)


def read_state_dict_from(payload: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in a payload :func:`read_payload` returned (``path`` names it in errors)."""
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        return payload["model"]
    if isinstance(payload, dict) and payload.get("format") == CONVERTED_FORMAT:
        return payload["state_dict"]
    if isinstance(payload, dict):
        for key in _NESTED_KEYS:
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
        if _is_state_dict(payload):
            return payload
    raise CheckpointError(f"{path} holds no state_dict (a mapping of parameter names to tensors)")


def read_payload(path: str | Path) -> Any:
    """What a ``.pt`` or ``.safetensors`` file holds, read without running code: a torch file's
    object, or a safetensors file's certify-fx records with its tensors under ``state_dict``."""
    if Path(path).suffix == ".safetensors":
        tensors, records = read_safetensors(path)
        return {**records, "state_dict": tensors}
    return read_torch_file(path)


def save_payload(state: dict[str, torch.Tensor], path: str | Path, records: dict[str, Any] | None = None) -> Path:
    """Write tensors and plain-data ``records`` atomically, in the format ``path``'s suffix names:
    ``.safetensors`` (records in the metadata) or a torch file (records beside ``state_dict``;
    the bare ``state_dict`` without records). :func:`read_payload` reads either back."""
    if Path(path).suffix == ".safetensors":
        return save_safetensors(state, path, records)
    state = {k: v.detach().cpu() for k, v in state.items()}
    return atomic_torch_save({**records, "state_dict": state} if records else state, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, records: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` (and JSON-able ``records`` as metadata) to a ``.safetensors`` file, atomically."""

    metadata = {_SAFETENSORS_KEY: json.dumps(records)} if records else None
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a ``.safetensors`` file and the certify-fx records in its metadata (``{}``
    for a file another tool wrote)."""

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        records = json.loads(metadata[_SAFETENSORS_KEY]) if _SAFETENSORS_KEY in metadata else {}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its certify-fx metadata is not valid JSON") from None
    return tensors, records if isinstance(records, dict) else {}


def load_weights(model: nn.Module, path: str | Path, key: str | None = None) -> nn.Module:
    """Load the weights in ``path`` into ``model`` strictly (returns ``model``).

    A ``module.`` prefix (DataParallel/DDP) is removed. Shapes and key sets must match exactly.
    ``key`` picks weights saved beside others: an entry of the file (``"backbone"``, as the
    LiResNet code saves it; ``"a/b"`` for a nested one) or a parameter-name prefix (``"model"``
    for ``model.conv.weight``, ...), which is removed.

    Raises:
        CheckpointError: unreadable file, or weights that do not fit, naming missing, unexpected
            and mis-shaped keys.
    """
    state = read_state_dict(path, key)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        raise CheckpointError(f"the weights in {path} do not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model
