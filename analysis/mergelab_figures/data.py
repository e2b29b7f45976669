"""Where notebooks get their data: a study's named Datasets in the store.

A study publishes each Dataset under the store ref ``studies/<study>/<name>`` (``results``,
``analysis/<analysis>``, ``adapt/<label>``, ``preferences/<kind>``, …); notebooks take ``STORE``
and ``STUDY`` parameters and read through :func:`load`; ``STORE`` defaults to :data:`DEFAULT_STORE`.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from mergelab.store import Store

__all__ = ["DEFAULT_STORE", "NOT_COMPUTED", "available", "labelled_runs", "load", "optional", "study_ref"]

#: The store the demo writes (``studies/micro.yaml``: ``data/store`` in the checkout), as an absolute
#: path: a notebook opened in plain Jupyter starts its kernel in ``notebooks/``, where the relative
#: ``data/store`` would name ``notebooks/data/store``. (This module lives in the checkout's ``analysis/``.)
DEFAULT_STORE = str(Path(__file__).resolve().parents[2] / "data" / "store")

NOT_COMPUTED = "not computed in this study"


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


def optional(store: str | Store, study: str, name: str) -> xr.Dataset | None:
    """The Dataset ``name`` of ``study``, or None after printing that the study did not compute it.

    Notebooks draw a section only when its Dataset is there, so they run on studies that
    computed fewer analyses.
    """
    store = store if isinstance(store, Store) else Store(store)
    if name not in available(store, study):
        print(f"{name}: {NOT_COMPUTED} (study {study!r} in store {store.url!r})")
        return None
    return load(store, study, name)


def labelled_runs(store: str | Store, study: str, name: str) -> list[xr.Dataset]:
    """The Dataset ``name`` of ``study`` and its labelled runs (``<name>/<label>``: a second Pareto
    sweep of another pair, :func:`mergelab.experiments.registry.resolve`), first the unlabelled one,
    then by label; the ones the study published."""
    store = store if isinstance(store, Store) else Store(store)
    names = available(store, study)
    return [load(store, study, n) for n in [name, *sorted(n for n in names if n.startswith(f"{name}/"))] if n in names]
