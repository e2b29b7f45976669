"""Test-time adaptation of merge coefficients: registry ``ADAPTERS`` and :func:`adapt`.

| name             | directions (bank)                     | learned                          | objective |
|------------------|---------------------------------------|----------------------------------|-----------|
| ``adamerging``     | raw factors                           | λ per task or per module × task   | entropy   |
| ``tara_a``         | raw rank-1 LoRA directions (001 Eq. 7) | signed φ per direction            | entropy, STCH |
| ``tara_b``         | shared SVD of [ΔW_1 … ΔW_N] (Eq. 9)    | φ per task × shared direction      | entropy, STCH |
| ``adarank``        | each task's singular components        | masks (STE), λ per module × task   | entropy   |
| ``adamerging_tas`` | raw factors                           | λ per module × task               | TAS alignment (004 App. H) |

``tara_b`` and ``adarank`` take ``space="full"`` (default) or ``"core"``: their singular directions
are then computed from the core matrices of 003 and lifted back through the reference bases
(:func:`~mergelab.adaptation.bank.core_bank`); the space is recorded in the result's meta and
history attrs.

The SVDs of ``tara_b`` (the shared SVD, the KnOTS space's basis) and ``adarank`` (per-task SVDs) can
be computed once and passed in: ``adapt(..., bases={module: BankBasis})`` (``build(..., bases=)``); the
registry entry's ``basis`` says which decomposition that is and which hyper-parameters change it, so
a study takes them from the store (:func:`mergelab.bases.adaptation_bases`).

A new adaptive method is one builder ``(taskset, **hp) -> CoefficientModel`` and one registry
entry. Non-matrix parameters (biases, norms) always use the raw bank with the method's
per-task coefficients (a singular decomposition of a vector is meaningless).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from mergelab.adaptation.adapter import Adapter
from mergelab.adaptation.bank import Bank, BankBasis, core_bank, mean_bank, raw_bank, shared_svd_bank, task_svd_bank
from mergelab.adaptation.loop import AdaptResult, Forward, Schedule, anchors, peek, run, task_weights
from mergelab.adaptation.models import CoefficientModel, DirectionCoefficients, MaskedCoefficients, TaskCoefficients
from mergelab.adaptation.objectives import SCALARIZATIONS
from mergelab.checkpoints import peft_template
from mergelab.errors import InputError
from mergelab.merging.spectral import cart_rank
from mergelab.naming import GENERIC, ModuleLayout
from mergelab.params import Interval
from mergelab.registry import Registry
from mergelab.taskset import TaskSet, Update

__all__ = ["ADAPTERS", "COEFFICIENT", "LAMBDA_CART", "RANK_RATIO_CART", "SVD_SPACES", "AdaptResult", "Adapter", "BankBasis", "Forward",
           "Schedule", "adapt", "adarank_masks", "build"]


#: Spaces an SVD-based bank can be taken in (see :mod:`mergelab.adaptation.bank`).
SVD_SPACES = ("full", "core")


def _banks(taskset: TaskSet, matrix_bank: Callable[..., Bank], space: str = "full",
           bases: Mapping[str, BankBasis] | None = None, *,
           takes_matrix_bank: Callable[[str, tuple[int, ...]], bool] = lambda name, shape: len(shape) == 2,
           other_bank: Callable[[Sequence[Update]], Bank] = raw_bank) -> tuple[list[str], list[Bank]]:
    """One bank per module: ``matrix_bank`` for the modules ``takes_matrix_bank`` accepts (2-D ones by
    default; in ``space``, from ``bases[module]`` when given), ``other_bank`` (the raw bank) otherwise."""
    if space not in SVD_SPACES:
        raise InputError(f"space must be one of {', '.join(SVD_SPACES)}, got {space!r}")
    modules = list(taskset.module_names)
    banks = []
    for m in modules:
        updates = taskset.updates(m)
        if not takes_matrix_bank(m, tuple(updates[0].shape)):
            banks.append(other_bank(updates))
            continue
        given = BankBasis(None) if bases is None else bases[m]
        if space == "core":
            banks.append(core_bank(updates, matrix_bank, reference=given.reference, svd=given.svd))
        else:
            banks.append(matrix_bank(updates) if given.svd is None else matrix_bank(updates, svd=given.svd))
    return modules, banks


def build_adamerging(taskset: TaskSet, *, granularity: Literal["task", "layer"] = "layer", init: float | None = None,
                     clamp: tuple[float, float] | None = (0.0, 1.0)) -> CoefficientModel:
    """AdaMerging (Yang et al., 2024): λ init 0.3; 004 App. H.2 initialises at 1/T for +TAS.

    ``clamp``: the range the λ are clamped to in every forward, ``[0, 1]`` as the original code
    (``clamp: null`` in a study's ``hp`` learns them unconstrained)."""
    if granularity not in ("task", "layer"):
        raise InputError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    modules, banks = _banks(taskset, raw_bank)
    init = 0.3 if init is None else init
    return TaskCoefficients(modules, banks, taskset.names, granularity=granularity, init=init, clamp=clamp)


def build_adamerging_tas(taskset: TaskSet, *, granularity: Literal["task", "layer"] = "layer", init: float | None = None,
                         clamp: tuple[float, float] | None = (0.0, 1.0)) -> CoefficientModel:
    """AdaMerging+TAS (004 App. H.2): λ initialised uniformly at 1/T."""
    return build_adamerging(taskset, granularity=granularity, init=1.0 / len(taskset) if init is None else init, clamp=clamp)


def build_tara_a(taskset: TaskSet, *, init: float = 0.4) -> CoefficientModel:
    """TARA Variant A (001 Eq. 7): ``W_0 + Σ_ij φ_ij b_ij a_ijᵀ``, signed φ, init 0.4."""
    modules, banks = _banks(taskset, raw_bank)
    return DirectionCoefficients(modules, banks, taskset.names, init=init)


def build_tara_b(taskset: TaskSet, *, init: float = 0.4, rank: int | None = None, space: Literal["full", "core"] = "full",
                 bases: Mapping[str, BankBasis] | None = None) -> CoefficientModel:
    """TARA Variant B (001 Eqs. 8–9): φ_ik on the top-R shared singular directions (R = all by default).

    ``space="core"``: the shared SVD is that of the core matrices ``[M_1 … M_N]`` (003 Eq. 8), its
    directions lifted through ``U_B^ref`` / ``V_A^ref`` (:func:`~mergelab.adaptation.bank.core_bank`):
    the same directions as ``"full"``, cheaper steps and a merged adapter of rank ``≤ Σ r_t``.
    ``bases``: per module the shared SVD (and, in core space, the reference bases), computed earlier.
    """
    modules, banks = _banks(taskset, lambda us, rtol=None, svd=None: shared_svd_bank(us, rank, rtol, svd), space, bases)
    model = DirectionCoefficients(modules, banks, taskset.names, init=init)
    model.space = space
    return model


def adarank_masks(name: str, shape: tuple[int, ...], layout: ModuleLayout = GENERIC) -> bool:
    """Whether AdaRank masks a module's singular components: the attention and MLP weight matrices
    only (their role in ``layout``, the task set's), as the official code (never positional or class
    embeddings, the patch convolution, the output projection, biases or norms)."""
    return len(shape) == 2 and layout.role(name) != "other"


def build_adarank(taskset: TaskSet, *, origin: Literal["ta", "cart"] = "ta", lam: float | None = None, rank_ratio: float = 0.16,
                  temperature: float = 10.0, space: Literal["full", "core"] = "full", learn_lambda: bool = True,
                  learn_mask: bool = True, lambda_granularity: Literal["module_task", "layer"] = "module_task",
                  bases: Mapping[str, BankBasis] | None = None) -> CoefficientModel:
    """AdaRank (002 Eq. 5, App. A). ``origin="ta"``: all components on, λ = 0.3.
    ``origin="cart"``: components of ``ΔW_i − mean`` around the average, the top
    :func:`~mergelab.merging.spectral.cart_rank` ``(rank_ratio)`` of each task on (CART init),
    λ = 1.0 unless given; 002 App. A grid-searches this λ together with the initial rank ratio
    (8, 12, 16 or 32 %), which a study does on val before adapting (``Adapter.start_grid``).

    Only the attention and MLP weight matrices are masked (:func:`adarank_masks`). The other modules
    keep the origin's merge: task arithmetic with the learned λ per task (TA origin; their mask is
    fixed on) or the weight average (CART origin: CART's rule for non-matrix parameters).

    ``space="core"``: per-task SVDs of the core matrices ``M_t`` (of ``M_t − mean_j M_j`` for CART),
    lifted through the reference bases; the same components as ``"full"`` (see
    :mod:`mergelab.adaptation.bank`). ``learn_lambda`` / ``learn_mask``: 002 Tab. 4's ablation.
    ``bases``: per module the per-task SVDs (and, in core space, the reference bases), computed earlier.

    ``lambda_granularity``: ``"module_task"`` (default) learns a λ per module and task, as the official
    code (``merge_weight`` of shape (T, #tensors)); ``"layer"`` one λ per layer shared by its modules and
    by every task, as 002 Eq. 5 prints ``λ^l`` (the modules outside the numbered blocks share one).

    It takes 10 parameters because it is AdaRank's builder in :data:`ADAPTERS`: every keyword but ``bases`` is a setting
    a study or ``--set`` may give (the registry reads them from this signature), ``bases`` the decomposition computed
    before.
    """
    if origin not in ("ta", "cart"):
        raise InputError(f"adarank origin must be 'ta' or 'cart', got {origin!r}")
    center = origin == "cart"
    masked = lambda name, shape: adarank_masks(name, shape, taskset.layout)  # noqa: E731
    modules, banks = _banks(taskset, lambda us, rtol=None, svd=None: task_svd_bank(us, center=center, rtol=rtol, svds=svd),
                            space, bases, takes_matrix_bank=masked, other_bank=mean_bank if center else raw_bank)
    keep, fixed = [], []
    for m, bank in zip(modules, banks, strict=True):
        shape = tuple(taskset.updates(m)[0].shape)
        fixed.append(not masked(m, shape))
        if not center or fixed[-1]:
            keep.append(torch.ones(bank.size, dtype=torch.bool))
            continue
        k = cart_rank(rank_ratio, shape)
        # components of each task are stored in descending singular value order
        position = torch.cat([torch.arange(int((bank.owner == t).sum())) for t in range(len(taskset))])
        keep.append(position < k)
    lam = (1.0 if center else 0.3) if lam is None else lam
    groups = None
    if lambda_granularity == "layer":
        layers = sorted({taskset.layout.layer(m) for m in modules})
        groups = [layers.index(taskset.layout.layer(m)) for m in modules]
    model = MaskedCoefficients(modules, banks, taskset.names, keep=keep, fixed=fixed, lam=lam, temperature=temperature,
                               learn_lambda=learn_lambda, learn_mask=learn_mask, lambda_groups=groups)
    model.space = space
    return model


def _adarank_basis(hp: Mapping[str, Any]) -> dict[str, Any]:
    return {"center": hp.get("origin", "ta") == "cart"}


#: 002 App. A: the CART origin's λ is grid-searched over 0.1, 0.2, …, 3.0
LAMBDA_CART = tuple(round(0.1 * i, 1) for i in range(1, 31))
#: 002 App. A: the CART origin's mask starts with the top 8, 12, 16 or 32 % of indices on, whichever is best
RANK_RATIO_CART = (0.08, 0.12, 0.16, 0.32)


def _adarank_start_grid(hp: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
    """002 App. A: the CART origin chooses λ and the initial rank ratio on val together (those ``hp`` does not set)."""
    if hp.get("origin", "ta") != "cart":
        return {}
    return {key: values for key, values in (("lam", LAMBDA_CART), ("rank_ratio", RANK_RATIO_CART)) if key not in hp}


#: The range of a starting merge coefficient λ (``init``, AdaRank's ``lam``): the papers start at 0.3 to 1 and
#: search λ up to 3 (002 App. A); far beyond, the merged weights are the task vectors blown up (float32
#: overflows at 3.4e38), so no run could mean it.
COEFFICIENT = Interval(-1e3, 1e3)

ADAPTERS: Registry[Adapter] = Registry("adaptive method", {
    "adamerging": Adapter(build_adamerging, intervals={"init": COEFFICIENT}),
    "tara_a": Adapter(build_tara_a, scalarization="stch", optimizer="adamw", intervals={"init": COEFFICIENT}),  # 001 Sec. 4: AdamW, lr 1e-3
    "tara_b": Adapter(build_tara_b, scalarization="stch", spaces=SVD_SPACES, basis=("knots", lambda hp: {}), optimizer="adamw",
                      intervals={"init": COEFFICIENT, "rank": Interval(1)}),  # rank: directions kept of the shared SVD
    "adarank": Adapter(build_adarank, spaces=SVD_SPACES, basis=("task_svd", _adarank_basis),
                       start=lambda hp: "lam" if hp.get("origin", "ta") == "ta" else None, start_grid=_adarank_start_grid,
                       intervals={"lam": COEFFICIENT, "rank_ratio": Interval(0.0, 1.0, low_open=True),  # a fraction of the rank on
                                  "temperature": Interval(0.0, low_open=True)}),  # the mask's sigmoid divides by it
    "adamerging_tas": Adapter(build_adamerging_tas, objective="tas", intervals={"init": COEFFICIENT}),
})


def build(method: str, taskset: TaskSet, *, bases: Mapping[str, BankBasis] | None = None, **hp: Any) -> CoefficientModel:
    """The coefficient model of ``method`` for ``taskset`` (hyper-parameters validated).

    ``bases``: precomputed decompositions of the method's bank (``{module: BankBasis}``, methods with a
    registry ``basis`` only), e.g. from :func:`mergelab.bases.adaptation_bases`.
    """
    space = hp.get("space", "full")
    if space not in ADAPTERS[method].spaces:
        raise InputError(f"{method} runs in the {' or '.join(ADAPTERS[method].spaces)} space, not {space!r}"
                         + ("; core-space variants exist for tara_b and adarank" if space == "core" else ""))
    if ADAPTERS[method].spaces == ("full",):
        hp = {k: v for k, v in hp.items() if k != "space"}
    if bases is not None:
        if ADAPTERS[method].basis is None:
            raise InputError(f"{method} builds its bank from the raw factors; it takes no bases")
        hp = {**hp, "bases": bases}
    ADAPTERS[method].check({k: v for k, v in hp.items() if k != "bases"}, method)
    model = ADAPTERS[method].build(taskset, **hp)
    model.layout = taskset.layout
    return model


def adapt(
    method: str,
    taskset: TaskSet,
    forward: Forward,
    batches: Sequence[Iterator],
    schedule: Schedule = Schedule(),
    *,
    anchor_batches: int = 2,
    record_every: int = 10,
    device: str = "cpu",
    bf16: bool = False,
    progress: Callable[[int, float], None] | None = None,
    bases: Mapping[str, BankBasis] | None = None,
    **hp: Any,
) -> AdaptResult:
    """Adapt ``method``'s coefficients on unlabeled batches (one iterator per task, in task order) as
    ``schedule`` says (:class:`~mergelab.adaptation.loop.Schedule`: its ``None`` settings take the
    method's paper ones, its :class:`Adapter`); ``hp``: the method's settings.

    STCH anchors ``z_t`` are measured with only task t's update applied (001 Sec. 3) on the first
    ``anchor_batches`` batches of each stream, which the loop then still sees (:func:`~mergelab.adaptation.loop.peek`:
    every method of a study steps on the same batches whatever it measures first); the TAS
    teachers are the fine-tuned models ``W_0 + ΔW_t``. ``bases``: the bank's decompositions,
    computed earlier (see :func:`build`); the result is the same, bit for bit.

    It takes 12 parameters because it is the one entry to every adaptive method: what is adapted (method, task set,
    forward, batches, schedule), the run options :func:`~mergelab.adaptation.loop.run` receives (anchors, recording,
    device, precision, progress), the precomputed ``bases`` and the method's own ``hp``.
    """
    model = build(method, taskset, bases=bases, **hp)
    schedule = schedule.for_method(ADAPTERS[method])
    if len(batches) != len(taskset):
        raise InputError(f"{len(batches)} batch streams for {len(taskset)} tasks; give one per task in task order")
    teachers = [task_weights(taskset, forward.base, t) for t in range(len(taskset))] if schedule.objective == "tas" else None
    z = None
    if SCALARIZATIONS[schedule.scalarization].anchored:
        first, batches = peek(batches, anchor_batches)
        z = anchors(schedule.objective, forward, taskset, first, teachers)
    result = run(model, forward, batches, schedule, anchor_values=z, teachers=teachers, record_every=record_every, device=device,
                 bf16=bf16, progress=progress,
                 meta={"method": method, "space": model.space, "hyper_parameters": dict(hp), "tasks": list(taskset.names),
                       "adaptive": True, "peft": peft_template(taskset)})
    result.history.attrs.update({"method": method, "space": model.space, "hyper_parameters": dict(hp)})
    return result
