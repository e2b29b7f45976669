"""Store upkeep (``mergelab store verify`` / ``gc``): find corrupt objects, remove leftovers.

Functions over a :class:`~mergelab.store.Store` that read its layout (module docstring of
:mod:`mergelab.store`) through the store's own path and marker helpers.
"""

from __future__ import annotations

import datetime as _dt
import time
import uuid

from mergelab.store import LEASE_S, MARKER, PAYLOAD, Store

__all__ = ["gc", "verify"]


def _stale(store: Store, path: str, lease_s: float) -> bool:
    """Whether ``path`` was last modified more than ``lease_s`` ago. A directory's age is its
    youngest file's; where the filesystem keeps no times (``memory://`` directories) the
    path counts as young, so gc never removes what may be a live write (``lease_s <= 0``
    removes regardless)."""
    if lease_s <= 0:
        return True
    infos = [store.fs.info(path)]
    if infos[0].get("type") == "directory":
        infos += list(store.fs.find(path, detail=True).values())
    stamps = [i.get("mtime", i.get("created", i.get("LastModified"))) for i in infos]
    stamps = [t.timestamp() if isinstance(t, _dt.datetime) else float(t) for t in stamps if t is not None]
    return bool(stamps) and time.time() - max(stamps) > lease_s


def verify(store: Store, quarantine: bool = False) -> list[tuple[str, str]]:
    """``(key, problem)`` for every object whose marker is unreadable, whose payload is missing,
    or whose payload no longer has the digest recorded when it was published (markers from
    before digests: the payload must still load). With ``quarantine`` each such object moves
    to ``quarantine/<key>.<token>``, so the key is unpublished and a rerun recomputes it."""
    problems: list[tuple[str, str]] = []
    for key in store._object_keys():
        marker_path = store._marker(key)
        if not store.fs.exists(marker_path):
            continue  # not published (in flight, or a leftover for gc)
        marker = store._read_marker(key)
        if marker is None or "kind" not in marker:
            problems.append((key, "marker is not readable JSON"))
        else:
            payload = store._payload(key, marker["kind"])
            if not store.fs.exists(payload):
                problems.append((key, f"payload {PAYLOAD[marker['kind']]} is missing"))
            elif marker.get("digest") and store._digest(payload) != marker["digest"]:
                problems.append((key, "payload differs from its published digest"))
            elif not marker.get("digest"):
                try:
                    store.get(key)
                except Exception as err:  # any failure to load is the finding
                    problems.append((key, f"payload does not load ({type(err).__name__})"))
        if quarantine and problems and problems[-1][0] == key:
            store.fs.makedirs(store._path("quarantine"), exist_ok=True)
            store.fs.mv(store._path("objects", key), store._path("quarantine", f"{key}.{uuid.uuid4().hex[:8]}"), recursive=True)
    return problems

def gc(store: Store, keep: set[str] | None = None, dry_run: bool = False, lease_s: float = LEASE_S) -> list[str]:
    """Remove leftovers older than ``lease_s`` (staging writes, unpublished objects, payloads a
    marker does not name) and, with ``keep``, every published artifact whose key is neither in
    ``keep`` nor named by a ref. A write younger than the lease is never touched, so gc may run
    beside live runs. Returns what was (or would be) removed."""
    removed: list[str] = []

    def remove(path: str, label: str) -> None:
        removed.append(label)
        if not dry_run:
            store.fs.rm(path, recursive=True)

    staging = store._path("staging")
    if store.fs.exists(staging):
        for path in store.fs.ls(staging, detail=False):
            if _stale(store, path, lease_s):
                remove(path, f"staging/{path.rstrip('/').rsplit('/', 1)[-1]}")
    keep_all = None if keep is None else set(keep) | set(store.refs().values())
    for key in store._object_keys():
        marker = store._read_marker(key)
        if marker is not None and keep_all is not None and key not in keep_all:
            remove(store._path("objects", key), key)
            continue
        entries = [p.rstrip("/") for p in store.fs.ls(store._path("objects", key), detail=False)]
        stale = [p for p in entries if p.rsplit("/", 1)[-1] != MARKER and _stale(store, p, lease_s)
                 and (marker is None or not marker.get("token") or p.rsplit("/", 1)[-1] != marker["token"])]
        if marker is None and stale and len(stale) == len([p for p in entries if p.rsplit("/", 1)[-1] != MARKER]):
            remove(store._path("objects", key), key)  # nothing published and nothing in flight
        elif marker is not None and marker.get("token"):
            for p in stale:
                remove(p, f"{key}/{p.rsplit('/', 1)[-1]}")
    return removed
