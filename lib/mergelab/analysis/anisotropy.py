"""Anisotropy of LoRA directions: the task-loss Jacobian restricted to LoRA directions (001 Sec. 2.3, App. E).

For a set of rank-1 LoRA directions ``{S_k}`` of one module and task losses ``f_1 … f_N``,
001 Eq. (3) defines the restricted Jacobian

    J[i, k] = <∇f_i(W), S_k>_F,

evaluated at the Task Arithmetic merge ``W = W_0 + λ Σ_i ΔW_i`` with ``λ = 0.3`` (001 Sec. 2.3;
App. E says "averaging task LoRA updates and then scaling by 0.3"; we follow the formula of
Sec. 2.3, which is also :func:`mergelab.merging.arithmetic.task_arithmetic`).

Two bases (001 App. E, Figs. 6–9):

- ``raw``: every task's rank-1 LoRA directions ``S_ij = b_ij a_ijᵀ`` (001 Eq. (1); PEFT
  orientation: ``b_ij`` column j of ``B_i`` with the scaling folded in, ``a_ijᵀ`` row j of ``A_i``),
  ``K = Σ r_i`` directions;
- ``svd``: the shared singular directions of ``X = [ΔW_1 … ΔW_N] = U Σ Vᵀ``,
  ``S_ik = u_k v_kiᵀ`` with ``v_ki`` task i's block of ``v_k`` (001 Eq. (8), without the ``σ_k`` of
  Eq. (9)), ``K = N · rank(X)`` directions. The SVD is the KnOTS space's, exact from the factors
  (:func:`mergelab.spaces.knots.knots_svd`).

Every ``S_k`` is rank one, ``S_k = ℓ_k r_kᵀ``, so ``<G, S_k>_F = ℓ_kᵀ G r_k``: one backward pass per
task (and validation batch) gives ``G_i = ∂f_i/∂W`` of every module, and the whole row
``J[i, :]`` is ``((G_i R ᵀ) ⊙ L).sum(0)`` — no ``S_k`` is ever formed and nothing is differentiated
per direction (:func:`naive_sensitivities` is that per-direction baseline, for tests and
``benchmarks/jacobian.py``).

Derived statistics per basis and module:

- singular values of ``J`` and their energy fractions ``σ_k² / Σ_j σ_j²`` (001 App. E, Fig. 8);
- ``κ(J) = σ_max / σ_min`` over the non-zero singular values (001 Prop. 1, Eq. (4));
- the direction-wise sensitivities ``h(ρ) = ρᵀ J`` (001 Eq. (5); ``g(ρ) = Σ_i ρ_i ∇f_i``), for
  ``ρ`` uniform (``h = mean_i J[i]``) and one-hot on task i (``h = J[i]``);
- ``κ(ρ) = max_k |h_k| / min_k |h_k|`` over the directions whose ``h_k`` is not exactly zero.
  001 App. E reports a "condition number κ(ρ)" of the sensitivities of one preference (Figs. 6–7)
  without a formula; a single vector has no singular spread, so we read it as the spread of the
  sensitivity magnitudes over directions (our choice, documented in ``docs/store.md``);
- the misalignment ``ξ(ρ_1, ρ_2) = 1 − |<h(ρ_1), h(ρ_2)>| / (‖h(ρ_1)‖ ‖h(ρ_2)‖)`` (001 Eq. (6)), with
  ``ρ_1`` uniform and ``ρ_2`` one-hot on each task in turn (001 Sec. 2.3, Fig. 2; App. E, Fig. 9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.analysis.batches import Batch, task_loss
from mergelab.analysis.factored import annotated, dataset_attrs, split_modules
from mergelab.analysis.spectra import energy_fractions
from mergelab.linalg import numerical_rank
from mergelab.naming import module_coords
from mergelab.spaces.knots import knots_svd
from mergelab.taskset import Dense, LowRank, TaskSet

if TYPE_CHECKING:
    from mergelab.model.base import Backbone

__all__ = [
    "BASES",
    "DirectionBasis",
    "lora_modules",
    "kappa",
    "loss_gradients",
    "naive_sensitivities",
    "raw_basis",
    "sensitivities",
    "svd_basis",
    "xi",
]


@dataclass(frozen=True, eq=False)
class DirectionBasis:
    """Rank-one directions ``S_k = left[:, k] · right[k]ᵀ`` of one module (float64).

    ``owner[k]``: the task the direction belongs to; ``index[k]``: its rank index ``j`` (raw) or
    singular component ``k`` (svd) inside that task, 1-based.
    """

    left: Tensor  # (out, K)
    right: Tensor  # (K, in)
    owner: Tensor  # (K,) long
    index: Tensor  # (K,) long

    @property
    def size(self) -> int:
        return int(self.owner.numel())

    def direction(self, k: int) -> Tensor:
        """The dense ``(out, in)`` matrix ``S_k`` (only for the per-direction baseline)."""
        return torch.outer(self.left[:, k], self.right[k])


def raw_basis(updates: Sequence[LowRank]) -> DirectionBasis:
    """001 Eq. (1): the rank-1 LoRA directions ``b_ij a_ijᵀ`` of every task, in task then rank order."""
    owner = torch.cat([torch.full((u.rank,), i, dtype=torch.long) for i, u in enumerate(updates)])
    index = torch.cat([torch.arange(1, u.rank + 1) for u in updates])
    left = torch.cat([u.B.detach().double() for u in updates], dim=1)  # (out, K)
    right = torch.cat([u.A.detach().double() for u in updates], dim=0)  # (K, in)
    return DirectionBasis(left, right, owner, index)


def svd_basis(updates: Sequence[LowRank], *, rtol: float | None = None) -> DirectionBasis:
    """001 Eq. (8): ``S_ik = u_k v_kiᵀ`` from ``[ΔW_1 … ΔW_N] = U Σ Vᵀ`` (numerical rank, ``rtol``)."""
    U, s, blocks = knots_svd(updates, rank_rtol=rtol)  # U (out, k), V_i (k, in)
    k, T = s.numel(), len(updates)
    return DirectionBasis(U.repeat(1, T), torch.cat(blocks, dim=0),
                          torch.arange(T).repeat_interleave(k), torch.arange(1, k + 1).repeat(T))


#: Direction bases of 001 App. E by name.
BASES = {"raw": raw_basis, "svd": svd_basis}


def sensitivities(gradient: Tensor, basis: DirectionBasis) -> Tensor:
    """``(<G, S_k>_F)_k = (ℓ_kᵀ G r_k)_k`` for a gradient ``G`` (out, in): one row of 001 Eq. (3)."""
    return ((gradient.detach().double() @ basis.right.T) * basis.left).sum(dim=0)  # (out, K) ⊙ (out, K) -> (K,)


def loss_gradients(backbone: Backbone, heads: Sequence[Tensor], batches: Sequence[Sequence[Batch]],
                   params: Mapping[str, Tensor], names: Sequence[str]) -> tuple[np.ndarray, list[dict[str, Tensor]]]:
    """``(f, G)``: every task's loss at ``params`` and ``G_i[m] = ∂f_i/∂W_m`` for the named parameters.

    ``f_i`` is the image-weighted mean of :func:`~mergelab.analysis.batches.task_loss` over task
    i's batches; each batch costs one forward and one backward pass (gradients accumulate), so
    the cost is independent of the number of directions.
    """
    leaves = {m: params[m].detach().clone().requires_grad_(True) for m in names}
    losses, grads = np.zeros(len(heads)), []
    for t, (head, task_batches) in enumerate(zip(heads, batches, strict=True)):
        total = sum(len(images) for images, _ in task_batches)
        acc = {m: torch.zeros_like(w) for m, w in leaves.items()}
        for images, labels in task_batches:
            f = task_loss(backbone, head, images, labels, {**params, **leaves}) * (len(images) / total)
            for m, g in zip(leaves, torch.autograd.grad(f, list(leaves.values())), strict=True):
                acc[m] += g
            losses[t] += float(f.detach())
        grads.append(acc)
    return losses, grads


def naive_sensitivities(backbone: Backbone, head: Tensor, task_batches: Sequence[Batch], params: Mapping[str, Tensor],
                        name: str, basis: DirectionBasis, directions: Sequence[int] | None = None) -> Tensor:
    """The per-direction baseline: ``d/dε f(W + ε S_k)`` at ``ε = 0`` by one backward pass per direction.

    Forms every ``S_k`` densely and differentiates the loss with respect to a scalar ``ε``; it
    gives the same ``J[i, k]`` as :func:`sensitivities` of :func:`loss_gradients` at
    ``K`` times the cost (the reference of the tests and of ``benchmarks/jacobian.py``).

    It takes 7 parameters because it recomputes the loss at ``W + ε S_k`` from scratch: backbone, head, batches,
    parameters, the module's name and its basis, and the directions to differentiate.
    """
    ks = range(basis.size) if directions is None else directions
    total = sum(len(images) for images, _ in task_batches)
    W = params[name].detach()
    out = []
    for k in ks:
        S = basis.direction(k).to(W.dtype)
        eps = torch.zeros((), dtype=W.dtype, requires_grad=True)
        value = torch.zeros((), dtype=torch.float64)
        for images, labels in task_batches:
            f = task_loss(backbone, head, images, labels, {**params, name: W + eps * S}) * (len(images) / total)
            value += torch.autograd.grad(f, eps)[0].double()
        out.append(value)
    return torch.stack(out)


def kappa(h: np.ndarray) -> float:
    """``κ(ρ) = max_k |h_k| / min_k |h_k|`` over the entries that are not exactly zero (NaN if none)."""
    a = np.abs(np.asarray(h, dtype=np.float64))
    a = a[a > 0]
    return float(a.max() / a.min()) if a.size else np.nan


def xi(h1: np.ndarray, h2: np.ndarray) -> float:
    """001 Eq. (6): ``1 − |<h1, h2>| / (‖h1‖ ‖h2‖)`` in [0, 1] (sign flips equivalent); NaN for a zero vector."""
    n = float(np.linalg.norm(h1) * np.linalg.norm(h2))
    return float(1.0 - min(abs(float(np.dot(h1, h2))) / n, 1.0)) if n > 0 else np.nan


def lora_modules(taskset: TaskSet) -> list[str]:
    """The 2-D parameters that every task updates with LoRA factors (the analysed modules)."""
    return [m for m in taskset.module_names if all(isinstance(u, LowRank) for u in taskset.updates(m))]


def restricted_jacobian(taskset: TaskSet, losses: np.ndarray, grads: Sequence[Mapping[str, Tensor]], n_images: Sequence[int], *,
                        lam: float, labels: bool, batch_size: int, batches: int | None, split_packed: bool = True,
                        rtol: float | None = None) -> xr.Dataset:
    """Restricted Jacobian ``J`` and its anisotropy statistics per basis × module (001 Sec. 2.3, App. E).

    ``losses[i]`` / ``grads[i][m]`` are ``f_i`` and ``∂f_i/∂W_m`` at the Task Arithmetic merge
    with coefficient ``lam`` (:func:`loss_gradients`) over ``n_images[i]`` validation images, the
    cross-entropy task loss (``labels``) or the label-free prediction entropy. Modules: every 2-D
    parameter that all tasks update with LoRA factors (the keys of ``grads``), packed q/k/v
    projections split into views (``split_packed``). ``rtol`` is the relative tolerance of the SVD
    basis (``None``: numerical rank). Schema in ``docs/store.md``; the experiment that measures the
    gradients on a bench is :func:`mergelab.experiments.probes.jacobian_anisotropy`.

    It takes 10 parameters: the measurement (task set, losses, gradients, image counts), four that only record in the
    attributes how it was measured (``lam``, ``labels``, ``batch_size``, ``batches``) and the basis' two options.
    """
    rows, owners = _jacobian_rows(taskset, grads, split_packed=split_packed, rtol=rtol)
    statistics = _anisotropy_statistics(rows, owners, len(taskset))
    attrs = dataset_attrs(taskset, title="anisotropy of LoRA directions (restricted task-loss Jacobian)",
                          paper="001 Sec. 2.3 (Eqs. (3)-(6), Prop. 1), App. E (Figs. 2, 6-9)", lam=lam,
                          objective="labels" if labels else "entropy", split="val", batch_size=batch_size,
                          batches=-1 if batches is None else batches, svd_rtol=-1.0 if rtol is None else rtol,
                          kappa_rho="max_k |h_k| / min_k |h_k| over h_k != 0 (our reading of 001 App. E)")
    return _anisotropy_dataset(taskset, losses, n_images, list(rows), statistics, attrs)


def _jacobian_rows(taskset: TaskSet, grads: Sequence[Mapping[str, Tensor]], *, split_packed: bool,
                   rtol: float | None) -> tuple[dict[str, dict[str, np.ndarray]], dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    """Step 1 of :func:`restricted_jacobian`: ``J[i, k] = <∇f_i(W), S_k>_F`` (001 Eq. (3)) per module view and basis, and per
    (view, basis) the task and index owning each direction ``S_k``."""
    rows: dict[str, dict[str, np.ndarray]] = {}  # module view -> basis -> J (T, K)
    owners: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for name in list(grads[0]):
        views = [split_modules({name: u}, split_packed=split_packed) for u in taskset.updates(name)]
        grad_views = [split_modules({name: Dense(g[name])}, split_packed=split_packed) for g in grads]
        for view in views[0]:
            updates = [v[view] for v in views]
            rows[view] = {}
            for b, build in BASES.items():
                basis = build(updates, rtol=rtol) if b == "svd" else build(updates)
                rows[view][b] = torch.stack([sensitivities(g[view].delta, basis) for g in grad_views]).numpy()
                owners[(view, b)] = basis.owner.numpy(), basis.index.numpy()
    return rows, owners


def _anisotropy_statistics(rows: Mapping[str, Mapping[str, np.ndarray]], owners: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]],
                           T: int) -> dict[str, np.ndarray]:
    """Step 2 of :func:`restricted_jacobian`: per basis × module, ``J`` padded to the most directions and its statistics
    (singular values, κ(J) of 001 Eq. (4), ``h(ρ)`` of Eq. (5), κ(ρ), ξ of Eq. (6)), named as the dataset's variables."""
    modules = list(rows)
    bases = list(BASES)
    K = max(J.shape[1] for per in rows.values() for J in per.values())
    C = min(T, K)
    shape = (len(bases), len(modules))
    J_all = np.full((*shape[:1], T, shape[1], K), np.nan)
    h_uniform = np.full((*shape, K), np.nan)
    owner, index = np.full((*shape, K), -1, dtype=np.int64), np.full((*shape, K), -1, dtype=np.int64)
    n_dir = np.zeros(shape, dtype=np.int64)
    sv, frac = np.full((*shape, C), np.nan), np.full((*shape, C), np.nan)
    kappa_J, kappa_u = np.full(shape, np.nan), np.full(shape, np.nan)
    kappa_1, xi_1 = np.full((len(bases), T, len(modules)), np.nan), np.full((len(bases), T, len(modules)), np.nan)
    for bi, b in enumerate(bases):
        for mi, m in enumerate(modules):
            J = rows[m][b]
            k = J.shape[1]
            n_dir[bi, mi] = k
            J_all[bi, :, mi, :k] = J
            owner[bi, mi, :k], index[bi, mi, :k] = owners[(m, b)]
            s = np.linalg.svd(J, compute_uv=False)
            sv[bi, mi, : s.size], frac[bi, mi, : s.size] = s, energy_fractions(s)
            q = numerical_rank(torch.from_numpy(s), J.shape, torch.float32)
            kappa_J[bi, mi] = s[0] / s[q - 1] if q > 0 else np.nan
            hu = J.mean(axis=0)  # ρ uniform: h = (1/N) Σ_i J[i]
            h_uniform[bi, mi, :k] = hu
            kappa_u[bi, mi] = kappa(hu)
            for t in range(T):  # ρ one-hot on task t: h = J[t]
                kappa_1[bi, t, mi] = kappa(J[t])
                xi_1[bi, t, mi] = xi(hu, J[t])
    return {"J": J_all, "n_directions": n_dir, "direction_task": owner, "direction_index": index, "singular_value": sv,
            "energy_fraction": frac, "kappa_J": kappa_J, "h_uniform": h_uniform, "kappa_uniform": kappa_u, "kappa_onehot": kappa_1,
            "xi": xi_1}


def _anisotropy_dataset(taskset: TaskSet, losses: np.ndarray, n_images: Sequence[int], modules: Sequence[str],
                        statistics: Mapping[str, np.ndarray], attrs: Mapping[str, object]) -> xr.Dataset:
    """Step 3 of :func:`restricted_jacobian`: the dataset (schema in ``docs/store.md``) of the losses and the statistics."""
    st = statistics
    K, C = st["J"].shape[-1], st["singular_value"].shape[-1]
    directions = ("basis", "module", "direction")
    return xr.Dataset(
        {
            "loss": annotated(("task",), losses, "f_i at the TA merge (entropy, or cross-entropy with labels)", "nats"),
            "n_images": annotated(("task",), np.asarray(n_images, dtype=np.int64),
                                  "validation images behind f_i"),
            "J": annotated(("basis", "task", "module", "direction"), st["J"], "J[i,k] = <∇f_i(W), S_k>_F", "nats / weight units"),
            "n_directions": annotated(("basis", "module"), st["n_directions"], "number of directions K"),
            "direction_task": annotated(directions, st["direction_task"], "task index (0-based, task order) owning S_k; -1 = padding"),
            "direction_index": annotated(directions, st["direction_index"],
                                         "rank index (raw) or singular component (svd) of S_k, 1-based; -1 = padding"),
            "singular_value": annotated(("basis", "module", "component"), st["singular_value"], "singular value σ_k(J)",
                                        "nats / weight units"),
            "energy_fraction": annotated(("basis", "module", "component"), st["energy_fraction"], "scree energy σ_k²/Σσ² of J"),
            "kappa_J": annotated(("basis", "module"), st["kappa_J"], "κ(J) = σ_max/σ_min over non-zero σ (001 Prop. 1)"),
            "h_uniform": annotated(directions, st["h_uniform"], "h(ρ_uniform) = mean_i J[i]", "nats / weight units"),
            "kappa_uniform": annotated(("basis", "module"), st["kappa_uniform"], "κ(ρ_uniform) = max|h_k| / min|h_k| (h_k ≠ 0)"),
            "kappa_onehot": annotated(("basis", "task", "module"), st["kappa_onehot"],
                                      "κ(ρ_onehot(task)) = max|h_k| / min|h_k| (h_k ≠ 0)"),
            "xi": annotated(("basis", "task", "module"), st["xi"], "ξ(ρ_uniform, ρ_onehot(task)) (001 Eq. (6))"),
        },
        coords={"basis": np.array(list(BASES), dtype=object), "task": np.array(taskset.names, dtype=object),
                **module_coords(modules, taskset.layout), "direction": np.arange(1, K + 1), "component": np.arange(1, C + 1)},
        attrs=attrs,
    )
