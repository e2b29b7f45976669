"""Store upkeep (``mergelab store verify`` / ``gc``): find corrupt objects, remove leftovers.

Functions over a :class:`~mergelab.store.Store` that read its layout (module docstring of
:mod:`mergelab.store_format`) through the store's own path and marker helpers.
"""

from __future__ import annotations

import datetime as _dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from mergelab.outputs import remove_leftovers
from mergelab.store import Store
from mergelab.store_format import LEASE_S, MARKER, PAYLOAD, STAGING_NAME, payload_digest

__all__ = ["damaged", "dangling_refs", "gc", "verify"]


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


def damaged(store: Store) -> list[tuple[str, str]]:
    """``(entry, problem)`` for every entry of ``objects/`` that is not an object's folder or whose
    marker is there but cannot be trusted (unreadable, not a JSON object, an unknown kind, a bad
    field), and every ref that is not ``{"key": ...}`` (``refs/<name>.json``). Cheap: reads markers
    only. ``ls`` skips these entries, ``verify`` reports them, ``gc`` removes the object entries."""
    found: list[tuple[str, str]] = []
    for key in store._object_keys():
        if not store.fs.isdir(store._path("objects", key)):
            found.append((key, "a file where an object's folder belongs"))
            continue
        _, problem = store._marker_state(key)
        if problem is not None:
            found.append((key, problem))
    found += [(f"refs/{name}.json", 'not a ref ({"key": ...}); remove it or publish its study again') for name in store.broken_refs()]
    return found


def verify(store: Store, quarantine: bool = False) -> list[tuple[str, str]]:
    """``(key, problem)`` for every damaged entry (:func:`damaged`), every object whose payload is
    missing, and every object whose payload no longer has the digest recorded when it was
    published (markers from before digests: the payload must still load). With ``quarantine``
    each such object entry moves to ``quarantine/<key>.<token>``, so the key is unpublished and a
    rerun recomputes it (an entry that cannot be moved says so in its problem). Every ref naming a key that
    is not published, then, is reported too (:func:`dangling_refs`)."""
    problems = damaged(store)
    bad = {entry for entry, _ in problems}
    for key in store._object_keys():
        marker = None if key in bad else store._read_marker(key)
        if marker is None:
            continue  # damaged (reported above) or not published (in flight, or a leftover for gc)
        payload = store._payload(key, marker["kind"])
        if not store.fs.exists(payload):
            problems.append((key, f"payload {PAYLOAD[marker['kind']]} is missing"))
        elif marker.get("digest") and payload_digest(store.fs, payload) != marker["digest"]:
            problems.append((key, "payload differs from its published digest"))
        elif not marker.get("digest"):
            try:
                store.get(key)
            except Exception as err:  # any failure to load is the finding
                problems.append((key, f"payload does not load ({type(err).__name__})"))
    if not quarantine:
        return problems + dangling_refs(store, skip={entry for entry, _ in problems})
    moved = []
    for key, problem in problems:
        if key.startswith("refs/"):
            moved.append((key, problem))
            continue
        try:
            store.fs.makedirs(store._path("quarantine"), exist_ok=True)
            store.fs.mv(store._path("objects", key), store._path("quarantine", f"{key}.{uuid.uuid4().hex[:8]}"), recursive=True)
        except OSError as err:
            problem += f"; not moved to quarantine ({err.strerror or type(err).__name__})"
        moved.append((key, problem))
    return moved + dangling_refs(store, skip={key for key, problem in moved if "not moved" in problem})


def dangling_refs(store: Store, skip: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``(refs/<name>.json, problem)`` for every ref naming a key that is not published (its object removed
    by hand, or quarantined by :func:`verify`): loading the name fails until its study runs again. Keys in
    ``skip`` are reported already, as damaged objects."""
    return [(f"refs/{name}.json", f"names {key}, which is not published (removed or quarantined); run the study that publishes it again")
            for name, key in sorted(store.refs().items()) if key not in skip and not store.exists(key)]


def gc(store: Store, keep: set[str] | None = None, dry_run: bool = False, lease_s: float = LEASE_S,
       on_error: Callable[[str, OSError], None] | None = None) -> list[str]:
    """Remove leftovers older than ``lease_s`` (staging writes, unpublished or damaged objects,
    payloads a marker does not name, entries of ``objects/`` that are not folders) and the
    ``.X.*`` folders of killed output writes in a local store's root that no live writer holds
    (:func:`~mergelab.outputs.remove_leftovers`), and, with ``keep``, every
    published artifact whose key is neither in ``keep`` nor named by a ref. A write younger than
    the lease is never touched, so gc may run beside live runs. An entry that cannot be inspected
    or removed (an unreadable folder, a read-only store) goes to ``on_error(label, error)`` and gc
    goes on; without ``on_error`` the error is raised. Returns what was (or would be) removed."""
    store.check_is_store()
    collector = _Collector(store, dry_run, lease_s, on_error)
    _collect_staging(collector)
    if store.local_root is not None:
        for path in remove_leftovers(store.local_root, dry_run=True):  # abandoned ones only; removed (or reported) here
            collector.remove(str(path), path.name)
    keep_all = None if keep is None else set(keep) | set(store.refs().values())
    for key in store._object_keys():
        try:
            _collect_object(collector, key, keep_all)
        except OSError as err:
            collector.failed(key, err)
    return collector.removed


@dataclass(frozen=True)
class _Collector:
    """One :func:`gc` run: the store, whether it only lists (``dry_run``), the lease, where errors go, and what it removed."""

    store: Store
    dry_run: bool
    lease_s: float
    on_error: Callable[[str, OSError], None] | None
    removed: list[str] = field(default_factory=list)

    def failed(self, label: str, err: OSError) -> None:
        """An entry that cannot be inspected or removed: to ``on_error``, or raised without one."""
        if self.on_error is None:
            raise err
        self.on_error(label, err)

    def remove(self, path: str, label: str) -> None:
        """Remove ``path`` (not in a dry run) and list it as ``label``; a failure goes to :meth:`failed` and is not listed."""
        if not self.dry_run:
            try:
                self.store.fs.rm(path, recursive=True)
            except OSError as err:
                self.failed(label, err)
                return
        self.removed.append(label)


def _collect_staging(collector: _Collector) -> None:
    """Step 1 of :func:`gc`: the store's staging writes (``staging/<key>.<token>``) older than the lease."""
    store, lease_s = collector.store, collector.lease_s
    staging = store._path("staging")
    if store.fs.exists(staging):
        for path in store.fs.ls(staging, detail=False):
            label = f"staging/{path.rstrip('/').rsplit('/', 1)[-1]}"
            if not STAGING_NAME.fullmatch(label.removeprefix("staging/")):
                continue  # not a write of the store's (staging/<key>.<token>)
            try:
                if _stale(store, path, lease_s):
                    collector.remove(path, label)
            except OSError as err:  # an entry that cannot be inspected is reported like one that cannot be removed
                collector.failed(label, err)


def _collect_object(collector: _Collector, key: str, keep_all: set[str] | None) -> None:
    """Step 3 of :func:`gc`, per entry of ``objects/``: a stale file or unpublished folder, a published object not in ``keep_all``,
    or a published object's stale payloads that its marker does not name."""
    store, lease_s, remove = collector.store, collector.lease_s, collector.remove
    folder = store._path("objects", key)
    if not store.fs.isdir(folder):
        if _stale(store, folder, lease_s):
            remove(folder, key)  # a file where an object's folder belongs
        return
    marker = store._read_marker(key)
    if marker is not None and keep_all is not None and key not in keep_all:
        remove(folder, key)
    elif marker is None:
        if _stale(store, folder, lease_s):
            remove(folder, key)  # nothing published (or a marker nobody can trust) and nothing in flight
    elif marker.get("token"):
        for p in (p.rstrip("/") for p in store.fs.ls(folder, detail=False)):
            name = p.rsplit("/", 1)[-1]
            if name not in (MARKER, marker["token"]) and _stale(store, p, lease_s):
                remove(p, f"{key}/{name}")
