"""Merging interference as the L1 distance between final embeddings (003 App. C.1, Fig. 6).

003 App. C.1 (following its refs. [53, 28]) measures interference as "the L1 distance between
the final embeddings of task-specific models and the merged one": for every task, the
activations of the final layer (the projection into the common vision-language space, here
``Backbone.encode_image``) of the task's fine-tuned model and of the merged model, and the mean
over the samples of ``‖f(x; θ_merged) − f(x; θ_t)‖₁``. This is :func:`mergelab.analysis.proxies.tas`
with ``distance="l1"``; 003 averages over the test set, we default to the validation images
(``split="val"``) like every other model-dependent analysis, and ``split="test"`` reproduces 003.

:func:`embedding_interference` takes a merged update; :func:`merged_embedding_interference`
(the registered analysis) merges the bench's tasks with a method, space and hyper-parameters
given as plain values, so a study can key it in the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from mergelab.adaptation.loop import task_weights
from mergelab.analysis.batches import weights_of
from mergelab.analysis.factored import annotated, dataset_attrs
from mergelab.analysis.proxies import DISTANCES, features
from mergelab.merging import merge
from mergelab.taskset import MergedUpdate

if TYPE_CHECKING:
    from mergelab.bench import Bench

__all__ = ["embedding_interference", "merged_embedding_interference"]


def embedding_interference(bench: Bench, merged: MergedUpdate, *, batch_size: int = 64, batches: int | None = None,
                           split: str = "val") -> xr.Dataset:
    """Mean L1 distance between the merged and each fine-tuned model's final embeddings; dims ``(task,)``."""
    taskset, backbone = bench.taskset, bench.backbone
    base = backbone.base_state()
    params = weights_of(base, merged)
    l1 = np.zeros(len(taskset))
    for t, name in enumerate(taskset.names):
        task = bench.tasks[name]
        f = features(backbone, task, params, batch_size=batch_size, batches=batches, split=split)
        g = features(backbone, task, {**base, **task_weights(taskset, base, t)}, batch_size=batch_size, batches=batches, split=split)
        l1[t] = float(DISTANCES["l1"](f, g).mean())
    return xr.Dataset(
        {"l1_distance": annotated(("task",), l1, "mean_x ‖f(x; θ_merged) − f(x; θ_t)‖₁ (final embeddings)", "feature units"),
         "l1_distance_mean": annotated((), float(l1.mean()), "l1_distance averaged over tasks", "feature units")},
        coords={"task": np.array(taskset.names, dtype=object)},
        attrs=dataset_attrs(taskset, title="final-embedding L1 interference", paper="003 App. C.1, Fig. 6", split=split,
                            batch_size=batch_size, batches=-1 if batches is None else batches,
                            merge_meta={k: v for k, v in merged.meta.items() if k in ("method", "space", "hyper_parameters")}),
    )


def merged_embedding_interference(bench: Bench, *, method: str = "task_arithmetic", space: str = "full",
                                  hp: Mapping[str, Any] | None = None, batch_size: int = 64, batches: int | None = None,
                                  split: str = "val") -> xr.Dataset:
    """:func:`embedding_interference` of ``merge(bench.taskset, method, space, **hp)`` (003 Fig. 6: TSV + Iso per space)."""
    merged = merge(bench.taskset, method, space, **dict(hp or {}))
    ds = embedding_interference(bench, merged, batch_size=batch_size, batches=batches, split=split)
    ds.attrs.update(method=method, space=space, hp=dict(hp or {}))
    return ds
