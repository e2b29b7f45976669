"""Where notebooks get their data: a study's named Datasets in the store.

A study publishes each Dataset under the store ref ``studies/<study>/<name>`` (``results``,
``analysis/<analysis>``, ``adapt/<label>``, ``preferences/<kind>``, …); notebooks take ``STORE``
and ``STUDY`` parameters and read through :func:`load`.
"""

from __future__ import annotations

import xarray as xr

from mergelab.store import Store

__all__ = ["available", "load", "study_ref"]


def study_ref(study: str, name: str) -> str:
    """The store ref of a study's Dataset ``name``."""
    return f"studies/{study}/{name}"


def load(store: str | Store, study: str, name: str) -> xr.Dataset:
    """The Dataset ``name`` of ``study`` (loaded into memory)."""
    store = store if isinstance(store, Store) else Store(store)
    return store.get_dataset(store.ref(study_ref(study, name)))


def available(store: str | Store, study: str) -> list[str]:
    """The names of every Dataset ``study`` has published."""
    store = store if isinstance(store, Store) else Store(store)
    prefix = study_ref(study, "")
    return sorted(name.removeprefix(prefix) for name in store.refs() if name.startswith(prefix))
