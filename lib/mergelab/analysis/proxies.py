"""Label-free proxies for choosing merge hyper-parameters: TAS and AdaMMS* (004 Sec. 3.2, App. D–E).

**Task alignment score** (004 Eq. (2)): for task t with unlabeled images ``D_t``,

    TAS_t(θ) = (1/|D_t|) Σ_{x ∈ D_t} d(f(x; θ), f(x; θ_t)),       TAS(θ) = (1/T) Σ_t TAS_t(θ),

where ``f(x; θ)`` is the image encoder's output feature and ``θ_t`` task t's fine-tuned model.
Here ``f`` is ``Backbone.encode_image``: the encoder's final embedding (for CLIP, the projection
into the shared vision-language space), unnormalised — 004 defines the proxy on the raw output
features; the EMA standardisation and per-patch-token cosine of 004 App. H.2 belong to the
*loss* (``adaptation.objectives.alignment_loss``), not to the proxy. ``d`` is one of (004 App. E,
Fig. 11) ``"l2"`` = ``‖a − b‖₂`` (the default of 004 Sec. 3.2), ``"l1"`` = ``‖a − b‖₁`` and
``"cos"`` = ``1 − cos(a, b)``. ``D_t`` is the task's **validation** images, the first
``batches × batch_size`` of them (004: 128 samples by default, robust to 1 vs 50 batches,
App. E, Fig. 10); labels and the test split are never read. **Lower TAS is better**: 004 selects
``λ*, μ* = argmin TAS(θ_merged(λ, μ))`` (:func:`select_by_tas`).

**AdaMMS*** (004 App. D, Eq. (5)): for an ordered hyper-parameter list ``α_0 < … < α_n``,

    AdaMMS_{α_i} = (d(α_{i−1}, α_i) + d(α_i, α_{i+1})) / 2,

with ``d(α, α')`` the mean feature distance between the models merged with ``α`` and ``α'``
(per task on its validation images; the task average is the score of the merge). Eq. (5) needs
both neighbours, so the two ends of the list have no score (NaN). We select the ``α`` with the
lowest score (the most stable merge, as AdaMMS selects by output consistency; :func:`select_adamms`);
004 transcribes the score, not the selection rule, so that is our reading.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mergelab.analysis.batches import image_batches
from mergelab.errors import InputError

if TYPE_CHECKING:
    from mergelab.data.tasks import ClassificationTask
    from mergelab.model.base import Backbone

__all__ = [
    "DISTANCES",
    "adamms_scores",
    "check_distance",
    "features",
    "select_adamms",
    "select_by_tas",
    "tas",
]

Params = Mapping[str, Tensor]


def _l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().sum(-1)


def _l2(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).norm(dim=-1)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


#: Per-sample dissimilarities ``d(f(x; θ), f(x; θ'))`` of 004 App. E (features ``(N, D)`` -> ``(N,)``).
DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": _l1, "l2": _l2, "cos": _cos}


def check_distance(distance: str) -> Callable[[Tensor, Tensor], Tensor]:
    if distance not in DISTANCES:
        raise InputError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    return DISTANCES[distance]


@torch.no_grad()
def features(backbone: Backbone, task: ClassificationTask, params: Params | None, *, batch_size: int = 64,
             batches: int | None = None, split: str = "val") -> Tensor:
    """``f(x; θ)`` (float64 ``(N, D)``) on the first ``batches × batch_size`` images of ``split`` (images only)."""
    return torch.cat([backbone.encode_image(x, params).double() for x, _ in
                      image_batches(task, batch_size=batch_size, batches=batches, split=split)])


def tas(backbone: Backbone, task: ClassificationTask, params: Params, finetuned_params: Params, *,
        distance: str = "l2", batch_size: int = 64, batches: int | None = None) -> float:
    """``TAS_t`` of 004 Eq. (2): mean ``d(f(x; params), f(x; finetuned_params))`` over task t's validation images.

    ``params`` / ``finetuned_params`` are replacement weights for ``encode_image`` (e.g.
    :func:`mergelab.adaptation.loop.task_weights`); only ``task.tensors("val")[0]`` is read.
    Lower is better.

    It takes 7 parameters: the model and task, the two sets of weights compared, and 004's three measurement settings
    (distance, batch size, batch count) that :func:`~mergelab.experiments.model_analyses.tas_sweep` varies.
    """
    d = check_distance(distance)
    merged = features(backbone, task, params, batch_size=batch_size, batches=batches)
    teacher = features(backbone, task, finetuned_params, batch_size=batch_size, batches=batches)
    return float(d(merged, teacher).mean())


def _lowest(scores: Mapping[Hashable, float]) -> Hashable:
    finite = {k: float(v) for k, v in scores.items() if np.isfinite(v)}
    if not finite:
        raise InputError("no finite score to select from")
    return min(finite, key=finite.__getitem__)


def select_by_tas(scores: Mapping[Hashable, float]) -> Hashable:
    """The configuration label with the lowest TAS (004 Sec. 3.2: ``argmin_λ,μ TAS``); ties -> first."""
    return _lowest(scores)


def select_adamms(scores: Mapping[Hashable, float]) -> Hashable:
    """The configuration with the lowest AdaMMS* score (ends of the list, NaN, are skipped)."""
    return _lowest(scores)


def adamms_scores(adjacent: Sequence[float]) -> np.ndarray:
    """004 Eq. (5) from ``adjacent[i] = d(α_i, α_{i+1})`` (n values for n + 1 configurations).

    ``score[i] = (adjacent[i−1] + adjacent[i]) / 2`` for ``0 < i < n``; NaN at both ends.
    """
    d = np.asarray(adjacent, dtype=np.float64)
    out = np.full(d.size + 1, np.nan)
    out[1:-1] = (d[:-1] + d[1:]) / 2
    return out
