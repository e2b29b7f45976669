"""Content hashes: the identity of every input the store keys on.

``content_hash(obj)`` is a SHA-256 over a canonical, type-tagged encoding of ``obj``. Tensors
and arrays hash by dtype, shape and bytes; mappings by sorted keys; objects that know their own
identity expose a ``content_hash`` attribute (``TaskUpdate``, ``TaskSet``). Equal inputs give
equal hashes across processes and machines; any change to a value, a key or a type changes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["content_hash", "tensor_digest"]


def _is_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a torch tensor, without importing torch: none exists before torch is imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def tensor_digest(t: torch.Tensor | np.ndarray, h: "hashlib._Hash | None" = None) -> str:
    """SHA-256 of a tensor's dtype, shape and contiguous bytes (device and strides ignored)."""
    h = h or hashlib.sha256()
    if _is_tensor(t):
        import torch

        t = t.detach().cpu().contiguous()
        h.update(f"torch:{t.dtype}:{tuple(t.shape)}".encode())
        # bfloat16 has no numpy dtype: hash its raw 16-bit pattern.
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        h.update(raw.numpy().tobytes())
    else:
        a = np.ascontiguousarray(t)
        h.update(f"numpy:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _update(h: "hashlib._Hash", obj: Any) -> None:
    if obj is None or isinstance(obj, (bool, str)):
        h.update(f"{type(obj).__name__}:{json.dumps(obj)};".encode())
    elif isinstance(obj, Enum):
        _update(h, obj.value)
    elif isinstance(obj, (int, np.integer)):
        h.update(f"int:{int(obj)};".encode())
    elif isinstance(obj, (float, np.floating)):
        value = float(obj)
        # Integral floats hash like ints so that `lam=1` and `lam=1.0` are one configuration.
        text = f"int:{int(value)}" if value.is_integer() and math.isfinite(value) else f"float:{value!r}"
        h.update(f"{text};".encode())
    elif _is_tensor(obj) or isinstance(obj, np.ndarray):
        h.update(f"tensor:{tensor_digest(obj)};".encode())
    elif hasattr(obj, "content_hash"):
        h.update(f"obj:{obj.content_hash};".encode())
    elif hasattr(obj, "model_dump"):  # pydantic models
        _update(h, obj.model_dump(mode="json"))
    elif isinstance(obj, Mapping):
        h.update(b"map{")
        for key in sorted(obj, key=str):
            _update(h, str(key))
            _update(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"seq[")
        for item in obj:
            _update(h, item)
        h.update(b"]")
    elif isinstance(obj, (set, frozenset)):
        _update(h, sorted(obj, key=repr))
    elif isinstance(obj, PurePath):
        _update(h, str(obj))
    else:
        raise TypeError(f"content_hash cannot encode {type(obj).__name__}; give it a content_hash attribute")


def content_hash(obj: Any) -> str:
    """Hex SHA-256 of a canonical encoding of ``obj`` (nested dicts, sequences, scalars, tensors)."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()
