"""The artifact store: content-addressed, atomic, on any fsspec filesystem.

Its layout, keys and markers: :mod:`mergelab.store_format`. An artifact is written under
``staging/``, moved as a whole to ``objects/<key>/<token>/`` (a name no other writer uses) and
published by writing its marker last, atomically (write then rename), so a crash at any point
leaves nothing that :meth:`Store.exists` or a getter will return. Any number of processes may
write the same key at once: each moves its own complete payload and the last marker wins, so a
published key always names a complete payload and no writer ever removes another's files. ``gc``
removes the leftovers older than a lease (and, given the keys still in use, the artifacts nobody
references; :mod:`mergelab.upkeep`, as is ``verify``).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from mergelab.errors import InputError, check_writable
from mergelab.store_format import (KEY_NAME, LAYOUT, MARKER, MAX_RECORD_BYTES, PAYLOAD, ArtifactInfo, Key, Kind, artifact_key, jsonable,
                                   marker_problem, payload_digest, provenance_of, zarr_ready)

if TYPE_CHECKING:  # xarray and torch load with the first Dataset or tensors: `mergelab store ls` needs neither
    import xarray as xr
    from torch import Tensor

    from mergelab.tensor_files import Spool

__all__ = ["STORE_ENV", "Store", "checkout_store", "default_store_url"]

STORE_ENV = "MERGELAB_STORE"


def checkout_store() -> Path | None:
    """``data/store`` of the source checkout mergelab runs from (an editable install: ``lib/mergelab``
    beside ``studies/``), the demo's store (``studies/micro.yaml`` says ``store: ../data/store``);
    None for an installed package."""
    root = Path(__file__).resolve().parents[2]
    return root / "data" / "store" if (root / "studies").is_dir() and (root / "lib" / "mergelab").is_dir() else None


def default_store_url() -> str:
    """The store of every command given no ``--store`` and no study: ``$MERGELAB_STORE``, else the
    checkout's ``data/store`` (:func:`checkout_store`: one store for the demo and every command run
    from a checkout), else the user's cache (``$XDG_CACHE_HOME/mergelab/store``, by default
    ``~/.cache/mergelab/store``); never a folder under the working directory. A study's own
    ``store:`` comes first for its commands: :meth:`mergelab.config.StudySpec.store_url`."""
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    checkout = checkout_store()
    if checkout is not None:
        return str(checkout)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mergelab", "store")


class Store:
    """Content-addressed artifacts on a local directory or any fsspec URL (``memory://``, ``s3://``…)."""

    def __init__(self, url: str | os.PathLike[str] | None = None) -> None:
        self.url = os.fspath(url) if url is not None else default_store_url()
        if any(ord(c) < 32 or ord(c) == 127 for c in self.url):
            raise InputError(f"store {self.url!r} holds a control character (a line break?); give one path or URL "
                             f"(--store, {STORE_ENV} or a study's store:)")
        protocol, path = fsspec.core.split_protocol(self.url)
        if protocol in ("file", "local") and not path.strip("/"):
            raise InputError(f"store URL {self.url!r} names no folder; write {protocol}:///absolute/path or a plain path")
        if protocol is not None and protocol not in fsspec.available_protocols():
            raise InputError(
                f"unknown store protocol {protocol!r} in {self.url!r}; use a local path, memory:// or an fsspec protocol such as s3://"
            )
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url)
        except ImportError as err:
            raise InputError(f"store URL {self.url!r} needs a package that is not installed ({err}); install it or use a local "
                             "path") from err
        self.root = root.rstrip("/")
        self._local = protocol in (None, "file", "local")
        if self._local and not os.path.isdir(self.root):  # an existing read-only store can still be read
            check_writable(self.root, "store", directory=True)
        elif self._local:
            self._check_layout()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def _check_layout(self) -> None:
        """InputError unless the existing local folder is empty or a store: its :data:`LAYOUT` names
        are folders, and a folder holding other files and none of them is someone else's (the shipped
        adapters, a checkout), where a command would write objects among the user's files."""
        try:
            entries = sorted(os.listdir(self.root))
        except OSError as err:
            raise InputError(f"store {self.url}: it cannot be read ({err.strerror or type(err).__name__}); "
                             "give yourself read access (chmod u+rx) or pass another --store") from None
        damaged = [name for name in LAYOUT if name in entries and not os.path.isdir(os.path.join(self.root, name))]
        if damaged:
            raise InputError(f"store {self.url}: {damaged[0]} is a file, not a folder, so this is no store (or a damaged one); "
                             "pass a store's folder, or an empty or new one")
        if entries and not set(entries) & set(LAYOUT):
            raise InputError(f"store {self.url} is a folder of other files (e.g. {entries[0]!r}), not a store (no "
                             f"{', '.join(name + '/' for name in LAYOUT[:2])}); pass a store's folder, or an empty or new one")

    @property
    def local_root(self) -> str | None:
        """The root directory of a store on the local filesystem; ``None`` for a remote one."""
        return self.root if self._local else None

    # keys -----------------------------------------------------------------------------------

    def key(self, producer: str, version: str, /, **inputs: Any) -> Key:
        """The key of what ``producer`` at ``version`` makes from ``inputs``.

        Inputs may be scalars, strings, nested dicts / lists, tensors, arrays, or objects with a
        ``content_hash`` (TaskUpdate, TaskSet). The key changes when any of them, the producer
        or its version changes, and only then.
        """
        return artifact_key(producer, version, inputs)

    # paths -----------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _url(self, path: str) -> str:
        """A URL xarray/zarr can open for a path inside this store's filesystem."""
        return path if self._local else self.fs.unstrip_protocol(path)

    def _marker(self, key: str) -> str:
        return self._path("objects", key, MARKER)

    # presence --------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """True when ``key`` is published (its marker is present, readable and well formed)."""
        return self._read_marker(key) is not None

    def _cat_record(self, path: str) -> bytes:
        """A marker's or ref's bytes: a regular file of at most :data:`MAX_RECORD_BYTES` (OSError
        otherwise, so a FIFO or a link to ``/dev/zero`` where a record belongs is damage, not a hang)."""
        info = self.fs.info(path)  # a link's target's: a link to /dev/zero is "other"
        if info.get("type") != "file":
            raise OSError(errno.EINVAL, "not a regular file", path)
        if (info.get("size") or 0) > MAX_RECORD_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_RECORD_BYTES} bytes", path)
        return self.fs.cat_file(path)

    def _read_marker(self, key: str) -> dict[str, Any] | None:
        return self._marker_state(key)[0]

    def _marker_state(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """``(marker, None)`` when ``key`` is published; ``(None, None)`` when it has no marker (not
        published: a write in flight or a leftover for gc); ``(None, problem)`` when a marker is
        there that this store cannot trust (what ``verify`` reports, what ``ls`` skips)."""
        try:
            raw = self._cat_record(self._marker(key))
        except FileNotFoundError:
            return None, None
        except OSError as err:  # e.g. objects/<key> is a file, or unreadable
            return None, f"marker cannot be read ({err.strerror or type(err).__name__})"
        try:
            marker = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None, "marker is not readable JSON"
        problem = marker_problem(marker)
        return (None, problem) if problem else (marker, None)

    def info(self, key: str) -> ArtifactInfo:
        marker = self._read_marker(key)
        if marker is None:
            raise KeyError(f"no published artifact {key!r} in store {self.url}")
        return ArtifactInfo(key, marker["kind"], marker.get("producer", ""), marker.get("created", ""), marker.get("attrs", {}))

    def _payload(self, key: str, kind: Kind) -> str:
        marker = self._read_marker(key)
        if marker is None:
            raise KeyError(f"no published artifact {key!r} in store {self.url}")
        if marker["kind"] != kind:
            raise KeyError(f"artifact {key!r} is a {marker['kind']}, not a {kind}")
        return self._path("objects", key, *([marker["token"]] if marker.get("token") else []), PAYLOAD[kind])

    # writing ---------------------------------------------------------------------------------

    def _write(self, key: str, kind: Kind, attrs: Mapping[str, Any] | None, write_payload) -> Key | str:
        """Stage, move into place under a writer-unique token, publish (module docstring)."""
        provenance = provenance_of(key, attrs)
        token = uuid.uuid4().hex[:12]
        staging = self._path("staging", f"{key}.{token}")
        self.fs.makedirs(staging, exist_ok=True)
        try:
            start = time.perf_counter()
            write_payload(f"{staging}/{PAYLOAD[kind]}", provenance)
            provenance.setdefault("write_time_s", round(time.perf_counter() - start, 6))
            if not self.exists(key):  # someone may have published the same content meanwhile: then keep theirs
                digest = payload_digest(self.fs, f"{staging}/{PAYLOAD[kind]}")
                self.fs.makedirs(self._path("objects", key), exist_ok=True)
                self.fs.mv(staging, self._path("objects", key, token), recursive=True)
                marker = {"kind": kind, "producer": provenance.get("producer", ""), "created": provenance["created"],
                          "token": token, "digest": digest, "attrs": provenance}
                self._write_marker(key, json.dumps(marker).encode())
        finally:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        return key

    def _write_marker(self, key: str, payload: bytes) -> None:
        tmp = self._marker(key) + f".{uuid.uuid4().hex[:8]}.tmp"
        self.fs.pipe_file(tmp, payload)
        self.fs.mv(tmp, self._marker(key))

    def put_dataset(self, key: str, ds: xr.Dataset, attrs: Mapping[str, Any] | None = None) -> str:
        """Publish an xarray Dataset as Zarr v3 with provenance attrs under ``key``."""

        def write(path: str, provenance: dict[str, Any]) -> None:
            out = zarr_ready(ds)
            out.attrs = jsonable({**ds.attrs, "provenance": provenance})
            out.to_zarr(self._url(path), mode="w", consolidated=False, zarr_format=3)

        return self._write(key, "dataset", attrs, write)

    def get_dataset(self, key: str, load: bool = True) -> xr.Dataset:
        """The Dataset under ``key`` (loaded into memory unless ``load=False``)."""
        import xarray as xr

        ds = xr.open_zarr(self._url(self._payload(key, "dataset")), consolidated=False, chunks=None)
        return ds.load() if load else ds

    def dataset_url(self, key: str) -> str:
        """A URL that ``xr.open_zarr(url, consolidated=False)`` opens directly (for notebooks)."""
        return self._url(self._payload(key, "dataset"))

    def put_tensors(self, key: str, tensors: Mapping[str, Tensor], attrs: Mapping[str, Any] | None = None) -> str:
        """Publish named tensors (model weights, bases) as one safetensors file under ``key``. A local store
        writes the file tensor by tensor (:func:`~mergelab.tensor_files.write_safetensors`): a :meth:`spool`
        or another mapping that reads its tensors when asked is never held whole."""
        from mergelab.tensor_files import write_safetensors

        def write(path: str, provenance: dict[str, Any]) -> None:
            metadata = {"provenance": json.dumps(provenance)}
            if self._local:
                write_safetensors(path, tensors, metadata)
            else:
                from safetensors.torch import save

                self.fs.pipe_file(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata))

        return self._write(key, "tensors", attrs, write)

    def get_tensors(self, key: str) -> dict[str, Tensor]:
        from safetensors.torch import load, load_file

        path = self._payload(key, "tensors")
        return load_file(path) if self._local else load(self.fs.cat_file(path))

    def tensors(self, key: str) -> Mapping[str, Tensor]:
        """The tensors under ``key`` read one at a time when asked for (:class:`~mergelab.tensor_files.FileTensors`;
        a remote store's are read at once): a model-sized payload is never mapped whole."""
        from mergelab.tensor_files import FileTensors

        return FileTensors(self._payload(key, "tensors")) if self._local else self.get_tensors(key)

    def spool(self, key: str) -> Spool:
        """An empty :class:`~mergelab.tensor_files.Spool` for ``key``'s tensors, to fill one at a time and
        publish with :meth:`put_tensors`: under ``staging/`` as a write of ``key`` in progress (``gc``
        removes one a crash left behind); a remote store's in a local temporary folder."""
        from mergelab.tensor_files import Spool

        token = uuid.uuid4().hex[:12]
        return Spool(self._path("staging", f"{key}.{token}") if self._local else Path(tempfile.gettempdir(), f"mergelab-spool-{token}"))

    def put_json(self, key: str, value: Any, attrs: Mapping[str, Any] | None = None) -> str:
        """Publish a small JSON document (a selection decision, a config) under ``key``."""

        def write(path: str, provenance: dict[str, Any]) -> None:
            self.fs.pipe_file(path, json.dumps(jsonable(value), indent=1).encode())

        return self._write(key, "json", attrs, write)

    def get_json(self, key: str) -> Any:
        return json.loads(self.fs.cat_file(self._payload(key, "json")))

    def get(self, key: str) -> Any:
        """The artifact under ``key``, whatever its kind (Dataset, tensor dict or JSON value)."""
        getters = {"dataset": self.get_dataset, "tensors": self.get_tensors, "json": self.get_json}
        return getters[self.info(key).kind](key)

    def memo(self, key: str, kind: Kind, compute: Callable[[], Any], attrs: Mapping[str, Any] | None = None) -> tuple[Any, bool]:
        """``(value, hit)``: the published artifact if ``key`` exists, else ``compute()`` published.

        This is how every pipeline node caches: on the content key of its inputs, so reruns and
        other studies reuse what is there and nothing half-written is ever trusted.
        """
        if self.exists(key):
            return self.get(key), True
        start = time.perf_counter()
        value = compute()
        self.put(key, kind, value, {"compute_time_s": round(time.perf_counter() - start, 6), **(attrs or {})})
        return value, False

    def put(self, key: str, kind: Kind, value: Any, attrs: Mapping[str, Any] | None = None) -> str:
        """Publish ``value`` as an artifact of ``kind`` (``put_dataset``, ``put_tensors`` or ``put_json``)."""
        putters = {"dataset": self.put_dataset, "tensors": self.put_tensors, "json": self.put_json}
        return putters[kind](key, value, attrs)

    # names -----------------------------------------------------------------------------------

    def set_ref(self, name: str, key: str) -> None:
        """Point a human name (``studies/micro/results``) at a published key."""
        parts = name.split("/")
        if not name or "\\" in name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"ref name {name!r} must be '/'-separated parts without '', '.', '..' or backslashes")
        if not self.exists(key):
            raise KeyError(f"cannot name unpublished artifact {key!r}")
        path = self._path("refs", f"{name}.json")
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(tmp, json.dumps({"key": str(key)}).encode())
        self.fs.mv(tmp, path)

    def ref(self, name: str) -> str:
        try:
            value = json.loads(self._cat_record(self._path("refs", f"{name}.json")))
        except FileNotFoundError:
            raise KeyError(f"store {self.url} has no artifact named {name!r}; run the study that writes it first") from None
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            value = None
        key = value.get("key") if isinstance(value, dict) else None
        if not isinstance(key, str):
            raise KeyError(f"the ref {name!r} in store {self.url} is damaged (not {{\"key\": ...}}); run the study that writes it again")
        return key

    def refs(self) -> dict[str, str]:
        """Every name and the key it points at; a ref file that is not ``{"key": "..."}`` is left out
        (:meth:`broken_refs` names it)."""
        return {name: key for name, key in self._ref_files().items() if isinstance(key, str)}

    def broken_refs(self) -> list[str]:
        """The names whose ref file is unreadable or not ``{"key": "..."}``."""
        return [name for name, key in self._ref_files().items() if not isinstance(key, str)]

    def _ref_files(self) -> dict[str, str | None]:
        root = self._path("refs")
        if not self.fs.exists(root):
            return {}
        out: dict[str, str | None] = {}
        for path in self.fs.find(root):
            if path.endswith(".json"):
                try:
                    value = json.loads(self._cat_record(path))
                except (OSError, ValueError, UnicodeDecodeError, RecursionError):
                    value = None
                key = value.get("key") if isinstance(value, dict) else None
                out[path[len(root) + 1 : -len(".json")]] = key if isinstance(key, str) else None
        return out

    # listing and cleaning ----------------------------------------------------------------------

    def _object_keys(self) -> list[str]:
        """The artifact names under ``objects/`` (:data:`KEY_NAME`: folders of objects, or whatever
        damage left under such a name); other names there are not the store's and are left alone."""
        return [name for name in self._object_entries() if KEY_NAME.fullmatch(name)]

    def _object_entries(self) -> list[str]:
        """Every name under ``objects/``."""
        root = self._path("objects")
        try:
            if not self.fs.exists(root):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(root, detail=False))
        except OSError as err:
            raise InputError(f"store {self.url}: {root} cannot be read ({err.strerror or type(err).__name__}); "
                             "give yourself read access to it (chmod u+rx) or pass another --store") from None

    def check_is_store(self) -> None:
        """InputError unless this folder holds a store or nothing yet: an ``objects/`` with entries of
        which none is an artifact belongs to something else (a git repository's object database)."""
        entries = self._object_entries()
        if entries and not self._object_keys():
            raise InputError(f"{self.url} is not a mergelab store (none of the {len(entries)} entries of its objects/ folder, "
                             f"e.g. {entries[0]!r}, is an artifact); pass the store's path")

    def ls(self) -> list[ArtifactInfo]:
        """Every published artifact, sorted by key."""
        return [self.info(k) for k in self._object_keys() if self.exists(k)]

    def __iter__(self) -> Iterator[ArtifactInfo]:
        return iter(self.ls())
