"""The store's format: its layout, its keys, and the markers and provenance it publishes artifacts with.

Layout under the root URL (:class:`mergelab.store.Store` writes and reads it)::

    objects/<key>/<token>/data.zarr | tensors.safetensors | data.json   a writer's payload
    objects/<key>/_published.json     the publish marker (provenance, the payload's token and digest)
    staging/<key>.<token>/...                                           writes in progress
    refs/<name>.json                                                    human names -> keys
    quarantine/<key>.<id>/                   objects that ``verify(quarantine=True)`` found corrupt

A key is ``<producer>-<sha256 of (producer, version, inputs)>``; markers of stores written before tokens
existed name ``objects/<key>/`` itself.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mergelab.hashing import content_hash

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["KEY_NAME", "LAYOUT", "LEASE_S", "MARKER", "MAX_RECORD_BYTES", "PAYLOAD", "STAGING_NAME", "ArtifactInfo", "Key", "Kind",
           "artifact_key", "jsonable", "marker_problem", "payload_digest", "provenance_of", "zarr_ready"]

MARKER = "_published.json"
#: The folders a store keeps at its root (``quarantine/``: what ``store verify --quarantine`` moves aside).
LAYOUT = ("objects", "refs", "staging", "quarantine")
#: The name of an artifact under ``objects/``: its producer and 32 hex digits of its inputs' hash
#: (:meth:`Store.key`). Nothing else there is the store's: its tools read, report and remove only these.
KEY_NAME = re.compile(r"[A-Za-z0-9_.+]+-[0-9a-f]{32}")
#: The largest marker or ref file a store reads (a marker holds an artifact's provenance and attributes).
MAX_RECORD_BYTES = 64 << 20
#: A write in progress under ``staging/``: ``<key>.<token>``.
STAGING_NAME = re.compile(rf"{KEY_NAME.pattern}\.[0-9a-f]{{12}}")
#: How long a write may be in flight before ``gc`` treats its files as leftovers (seconds).
LEASE_S = 3600.0
Kind = Literal["dataset", "tensors", "json"]
PAYLOAD: dict[str, str] = {"dataset": "data.zarr", "tensors": "tensors.safetensors", "json": "data.json"}


class Key(str):
    """A store key; also carries the producer, version and a JSON summary of its inputs."""

    producer: str
    version: str
    inputs: dict[str, str]

    def __new__(cls, value: str, producer: str = "", version: str = "", inputs: Mapping[str, str] | None = None) -> Key:
        key = super().__new__(cls, value)
        key.producer, key.version, key.inputs = producer, version, dict(inputs or {})
        return key


@dataclass(frozen=True)
class ArtifactInfo:
    key: str
    kind: str
    producer: str
    created: str
    attrs: dict[str, Any]


def artifact_key(producer: str, version: str, inputs: Mapping[str, Any]) -> Key:
    """The key of what ``producer`` at ``version`` makes from ``inputs`` (:meth:`mergelab.store.Store.key`)."""
    if not re.fullmatch(r"[A-Za-z0-9_.+]+", producer):
        raise ValueError(f"producer name {producer!r} must match [A-Za-z0-9_.+]+")
    digest = content_hash({"producer": producer, "version": version, "inputs": inputs})
    return Key(f"{producer}-{digest[:32]}", producer, version, {k: _summary(v) for k, v in inputs.items()})


def _summary(value: Any) -> str:
    """A short human-readable stand-in for an input in provenance attrs."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 80 else f"{text[:60]}…#{content_hash(value)[:12]}"
    return f"{type(value).__name__}#{content_hash(value)[:16]}"


def jsonable(value: Any) -> Any:
    """Attrs must survive JSON: numpy scalars -> Python, unknown objects -> str."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def provenance_of(key: str, attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The provenance an artifact is published with: its key's producer, version and inputs, the versions
    of mergelab and torch, the host and the time, then ``attrs``."""
    from mergelab import __version__

    import torch

    base = {
        "key": str(key),
        "producer": getattr(key, "producer", ""),
        "producer_version": getattr(key, "version", ""),
        "inputs": getattr(key, "inputs", {}),
        "mergelab_version": __version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return jsonable({**base, **(attrs or {})})


#: A marker's fields and their JSON types (``token`` and ``digest`` may be absent in stores written
#: before they existed; ``kind`` is required and names a :data:`PAYLOAD`).
_MARKER_FIELDS: dict[str, type | tuple[type, ...]] = {"kind": str, "producer": str, "created": str, "token": (str, type(None)),
                                                       "digest": (str, type(None)), "attrs": dict}


def marker_problem(marker: Any) -> str | None:
    """Why ``marker`` (parsed JSON) is not a marker this store wrote, or None."""
    if not isinstance(marker, dict):
        return f"marker is not a JSON object (a {type(marker).__name__})"
    if "kind" not in marker:
        return "marker names no kind"
    wrong = [f for f, types in _MARKER_FIELDS.items() if f in marker and not isinstance(marker[f], types)]
    if wrong:
        return f"marker field {wrong[0]!r} has the wrong type ({type(marker[wrong[0]]).__name__})"
    if marker["kind"] not in PAYLOAD:
        return f"marker names an unknown kind {marker['kind'][:40]!r} (known: {', '.join(PAYLOAD)})"
    token = marker.get("token")
    if token is not None and not re.fullmatch(r"[A-Za-z0-9_]{1,64}", token):
        return f"marker's payload token {token[:40]!r} is not a payload folder name"
    return None


def payload_digest(fs: Any, path: str) -> str:
    """sha256 over a payload's files on ``fs`` (relative names and bytes, in name order), read in blocks: a
    model-sized payload is never read whole."""
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f[len(path):].encode() + b"\0")
        with fs.open(f, "rb") as payload:
            for block in iter(lambda: payload.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def zarr_ready(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width unicode arrays become object strings (zarr 3 warns on ``<U``); attrs are reset."""
    out = ds.copy(deep=False)
    for name, var in {**out.coords, **out.data_vars}.items():
        if var.dtype.kind == "U":
            out[name] = var.astype(object)
    for var in out.variables.values():
        var.encoding.clear()
    return out
