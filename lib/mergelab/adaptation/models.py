"""Learnable coefficient maps over direction banks: the adaptive merged models.

A :class:`CoefficientModel` holds one :class:`~mergelab.adaptation.bank.Bank` per module and
learnable tensors that determine each bank's coefficients ``c``; :meth:`deltas` gives the
differentiable per-module updates that a functional forward (``torch.func.functional_call``)
adds to the base weights, and :meth:`merged_update` the final (low-rank where possible) merge.

* :class:`TaskCoefficients` — AdaMerging (Yang et al., 2024): ``c_k = λ_{owner(k)}`` task-wise,
  or ``λ_{m, owner(k)}`` per module ("layer-wise"), optionally clamped.
* :class:`DirectionCoefficients` — TARA (001 Eqs. 7 and 9): a free signed ``φ`` per direction.
* :class:`MaskedCoefficients` — AdaRank (002 Eq. 5, App. A): ``c_k = λ_{m, owner(k)} · B_k`` (or ``λ_l``) with
  the binary mask ``B_k = 1{σ(x̃_k / T) ≥ 0.5}`` learned through a straight-through estimator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mergelab.adaptation.bank import Bank
from mergelab.naming import GENERIC, ModuleLayout
from mergelab.taskset import BaseRef, MergedUpdate

__all__ = ["CoefficientModel", "DirectionCoefficients", "MaskedCoefficients", "TaskCoefficients", "straight_through_mask"]


def straight_through_mask(logits: Tensor, temperature: float) -> Tensor:
    """002 App. A: forward ``1{σ(x/T) ≥ 0.5}``, backward the gradient of ``σ(x/T)``."""
    p = torch.sigmoid(logits / temperature)
    hard = (p >= 0.5).to(p.dtype)
    return p + (hard - p).detach()


class CoefficientModel(nn.Module):
    """Banks (fixed) + learnable coefficients; subclasses define :meth:`coefficients`."""

    #: The space the banks' directions were taken in (``"full"`` or ``"core"``); set by the builder.
    space: str = "full"
    #: The task set's module layout (its history's ``layer`` / ``kind`` coordinates); set by :func:`~mergelab.adaptation.build`.
    layout: ModuleLayout = GENERIC

    def __init__(self, modules: Sequence[str], banks: Sequence[Bank], tasks: Sequence[str]) -> None:
        super().__init__()
        self.module_names = list(modules)
        self.banks = list(banks)
        self.task_names = list(tasks)

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def coefficients(self) -> list[Tensor]:
        """One coefficient vector ``c`` (length ``bank.size``) per module."""
        raise NotImplementedError

    def to_device(self, device: torch.device | str) -> CoefficientModel:
        self.to(device)
        self.banks = [b.to(device) for b in self.banks]
        return self

    def deltas(self) -> dict[str, Tensor]:
        """Differentiable dense update per module: ``offset + B diag(c) A``."""
        return {m: bank.delta(c) for m, bank, c in zip(self.module_names, self.banks, self.coefficients(), strict=True)}

    def weights(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Replacement parameters ``W_0 + ΔW(c)`` for a functional forward."""
        return {m: base[m].to(d) + d for m, d in self.deltas().items()}

    def merged_update(self, base: BaseRef | None = None, meta: Mapping | None = None) -> MergedUpdate:
        with torch.no_grad():
            modules = {m: bank.update(c) for m, bank, c in zip(self.module_names, self.banks, self.coefficients(), strict=True)}
        return MergedUpdate(modules, base or BaseRef("unknown"), dict(meta or {}))

    def state(self) -> dict[str, np.ndarray]:
        """The learned values to record per iteration (for trajectories)."""
        return {name: p.detach().float().cpu().numpy().copy() for name, p in self.named_parameters()}

    def _per_task(self, values: Sequence[Tensor]) -> np.ndarray:
        """``(module, task)`` means of per-direction ``values`` over each task's directions (NaN for none)."""
        per = self._per_component(values)
        count = (~np.isnan(per)).sum(-1)
        return np.where(count > 0, np.nansum(per, -1) / np.maximum(count, 1), np.nan)

    def summary(self) -> dict[str, np.ndarray]:
        """Per ``(module, task)`` statistics recorded with :meth:`state` (002 Fig. 5, 004 Fig. 14):
        ``coefficient_mean``, the mean coefficient ``c_k`` over task t's directions (λ for AdaMerging)."""
        with torch.no_grad():
            return {"coefficient_mean": self._per_task(self.coefficients())}

    def _per_component(self, values: Sequence[Tensor]) -> np.ndarray:
        """``(module, task, component)``: per-direction ``values`` of each task in bank order (its
        singular components by decreasing σ for an SVD bank), NaN past a task's last direction."""
        counts = [[int((bank.owner == t).sum()) for t in range(self.n_tasks)] for bank in self.banks]
        out = np.full((len(self.banks), self.n_tasks, max(max(c) for c in counts)), np.nan)
        for i, (v, bank) in enumerate(zip(values, self.banks, strict=True)):
            owner = bank.owner.to(v.device)
            for t in range(self.n_tasks):
                out[i, t, :counts[i][t]] = v.detach()[owner == t].float().cpu().numpy()
        return out

    def components(self) -> dict[str, np.ndarray]:
        """Per ``(module, task, component)`` values recorded with :meth:`state` (none here; AdaRank's masks)."""
        return {}


class TaskCoefficients(CoefficientModel):
    """AdaMerging: one λ per task (``granularity="task"``) or per module and task (``"layer"``)."""

    def __init__(self, modules, banks, tasks, *, granularity: str = "layer", init: float = 0.3,
                 clamp: tuple[float, float] | None = None) -> None:
        super().__init__(modules, banks, tasks)
        shape = (self.n_tasks,) if granularity == "task" else (len(self.module_names), self.n_tasks)
        self.granularity = granularity
        self.lam = nn.Parameter(torch.full(shape, float(init)))
        self.clamp = clamp

    def lambdas(self) -> Tensor:
        return self.lam if self.clamp is None else self.lam.clamp(*self.clamp)

    def coefficients(self) -> list[Tensor]:
        lam = self.lambdas()
        rows = [lam] * len(self.banks) if self.granularity == "task" else list(lam)
        return [row[bank.owner] for row, bank in zip(rows, self.banks, strict=True)]


class DirectionCoefficients(CoefficientModel):
    """TARA: a signed, freely learned φ per direction of each module's bank (001 Eqs. 7, 9)."""

    def __init__(self, modules, banks, tasks, *, init: float = 0.4) -> None:
        super().__init__(modules, banks, tasks)
        self.phi = nn.ParameterList([nn.Parameter(torch.full((b.size,), float(init))) for b in self.banks])

    def coefficients(self) -> list[Tensor]:
        return list(self.phi)


class MaskedCoefficients(CoefficientModel):
    """AdaRank: binary masks over each task's singular components and λ per module × task.

    ``keep[m]`` (bool per direction) sets the initial mask: logits ``±init_logit`` so that
    ``σ(±init_logit / T)`` sits just either side of 0.5, as the reference initialisation does.
    ``learn_lambda`` / ``learn_mask`` freeze either part (the ablation of 002 Tab. 4); ``fixed[m]``
    freezes module ``m``'s mask at ``keep[m]`` (modules AdaRank does not mask). ``lambda_groups``:
    module m's λ is ``lam[lambda_groups[m]]``, one value shared by every task (002 Eq. 5's ``λ^l``
    with a group per layer); ``None``: a λ per module and task, as the official code.

    Its constructor takes 11 parameters: the shared three (modules, banks, tasks) and AdaRank's eight settings above,
    each set by :func:`~mergelab.adaptation.build_adarank`.
    """

    def __init__(self, modules, banks, tasks, *, keep: Sequence[Tensor], fixed: Sequence[bool] | None = None, lam: float = 0.3,
                 temperature: float = 10.0, init_logit: float = 0.1, learn_lambda: bool = True,
                 learn_mask: bool = True, lambda_groups: Sequence[int] | None = None) -> None:
        super().__init__(modules, banks, tasks)
        self.temperature = temperature
        fixed = list(fixed) if fixed is not None else [False] * len(self.module_names)
        self.logits = nn.ParameterList([nn.Parameter(torch.where(k, init_logit, -init_logit).float(),
                                                     requires_grad=learn_mask and not f)
                                        for k, f in zip(keep, fixed, strict=True)])
        shape = (len(self.module_names), self.n_tasks) if lambda_groups is None else (max(lambda_groups) + 1, 1)
        self.lam = nn.Parameter(torch.full(shape, float(lam)), requires_grad=learn_lambda)
        self.register_buffer("lambda_rows", torch.arange(len(self.module_names)) if lambda_groups is None
                             else torch.as_tensor(list(lambda_groups)))

    def lambdas(self) -> Tensor:
        """``(module, task)``: the λ every module applies to each task's components."""
        return self.lam[self.lambda_rows].expand(-1, self.n_tasks)

    def masks(self) -> list[Tensor]:
        return [straight_through_mask(x, self.temperature) for x in self.logits]

    def summary(self) -> dict[str, np.ndarray]:
        """Adds ``mask_kept_fraction`` (share of task t's singular components kept, 002 Fig. 5) and ``lambda``."""
        with torch.no_grad():
            return {**super().summary(), "mask_kept_fraction": self._per_task(self.masks()),
                    "lambda": self.lambdas().detach().float().cpu().numpy().copy()}

    def components(self) -> dict[str, np.ndarray]:
        """``mask``: the binary mask ``B_k`` over each task's singular components (002 Fig. 5), in order of σ."""
        with torch.no_grad():
            return {"mask": self._per_component(self.masks())}

    def coefficients(self) -> list[Tensor]:
        return [lam[bank.owner] * mask for lam, bank, mask in zip(self.lambdas(), self.banks, self.masks(), strict=True)]
