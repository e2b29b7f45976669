"""Label-free per-task objectives and their scalarisations.

Per-task objectives ``f_t``:

* :func:`entropy` — mean Shannon entropy of the softmax prediction (AdaMerging, Yang et al. 2024;
  002 Eq. 6; 001 Sec. 3 "we use predictive entropy").
* :func:`alignment_loss` — the task alignment score as a loss (004 App. H, Eqs. 6–7): ``1 − cos``
  between student and teacher features per patch token, averaged over tokens, on features
  standardised by an exponential moving average of their statistics (:class:`EmaStandardizer`).
* :func:`cross_entropy` — the labelled loss, only when a study explicitly allows labels.

Scalarisations of ``f = (f_1 … f_T)`` under a preference ``ρ`` on the simplex:

* :func:`weighted_sum` — ``Σ ρ_t f_t``.
* :func:`smooth_tchebycheff` — 001 Eq. (10): ``α log Σ exp(ρ_t |f_t − z_t| / α)``.

:data:`SCALARIZATIONS` names them for every adaptive method: ``sum``, ``stch`` (Eq. 10 as printed, with
the absolute value) and ``stch_signed`` (``ρ_t (f_t − z_t)``, TARA's official ``STCHLoss``). The two
STCH forms differ only for a task below its anchor: as printed, such a task is pushed back *up* to
``z_t`` (the gradient of ``|f_t − z_t|`` is −1 there); signed, going below the anchor lowers Ψ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mergelab.errors import InputError

__all__ = [
    "SCALARIZATIONS",
    "EmaStandardizer",
    "Scalarization",
    "alignment_loss",
    "cross_entropy",
    "entropy",
    "smooth_tchebycheff",
    "validate_preference",
    "weighted_sum",
]


def entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of ``H(softmax(logits)) = −Σ_c p_c log p_c`` (nats)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The labelled task loss (only for studies that set ``allow_labels``)."""
    return F.cross_entropy(logits.float(), labels)


class EmaStandardizer:
    """Per-channel standardisation by EMA mean / variance (004 App. H.2, "Normalization").

    One instance per model whose features are aligned (the student and every teacher): the
    statistics are updated from each batch (without gradient) and applied to it.
    """

    def __init__(self, momentum: float = 0.99, eps: float = 1e-6) -> None:
        self.momentum, self.eps = momentum, eps
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def __call__(self, tokens: Tensor) -> Tensor:
        flat = tokens.detach().float().reshape(-1, tokens.shape[-1])
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
        if self.mean is None:
            self.mean, self.var = mean, var
        else:
            m = self.momentum
            self.mean = m * self.mean + (1 - m) * mean
            self.var = m * self.var + (1 - m) * var
        return (tokens.float() - self.mean) / (self.var + self.eps).sqrt()


def alignment_loss(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """004 Eq. (6) with ``d = 1 − cos``, per token then averaged (patch tokens only, (N, L, W))."""
    return (1 - F.cosine_similarity(student_tokens.float(), teacher_tokens.float(), dim=-1)).mean()


def validate_preference(preference: Sequence[float] | Tensor | None, tasks: int) -> Tensor:
    """ρ on the simplex Δ_{T−1}: non-negative, sums to 1, one entry per task (uniform if None)."""
    if preference is None:
        return torch.full((tasks,), 1.0 / tasks, dtype=torch.float64)
    rho = torch.as_tensor(preference, dtype=torch.float64).flatten()
    if rho.numel() != tasks:
        raise InputError(f"preference has {rho.numel()} entries for {tasks} tasks; give one weight per task")
    if not torch.isfinite(rho).all() or (rho < 0).any():
        raise InputError(f"preference {rho.tolist()} must be finite and non-negative (a point on the simplex)")
    if abs(float(rho.sum()) - 1.0) > 1e-6:
        raise InputError(f"preference {rho.tolist()} sums to {float(rho.sum()):.6g}, not 1; normalise it onto the simplex")
    return rho


def weighted_sum(losses: Tensor, preference: Tensor, anchors: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``Σ_t ρ_t f_t`` (linear scalarisation; anchors and α are ignored)."""
    return (preference.to(losses) * losses).sum()


def smooth_tchebycheff(losses: Tensor, preference: Tensor, anchors: Tensor | None = None, alpha: float = 1.0, *,
                       signed: bool = False) -> Tensor:
    """001 Eq. (10): ``Ψ = α log Σ_t exp(ρ_t |f_t − z_t| / α)``; ``signed=True``: ``ρ_t (f_t − z_t)``.

    Small α approaches ``max_t ρ_t |f_t − z_t|`` (the worst task); large α a softened sum.
    Anchors ``z_t`` default to 0. The default is the equation as printed: a task whose loss falls
    below its anchor (the merge more confident on it than its own fine-tuned model) is pulled back
    up to ``z_t``. ``signed=True`` is TARA's official code (``STCHLoss``), where it is rewarded.
    """
    if alpha <= 0:
        raise InputError(f"STCH smoothing alpha must be > 0, got {alpha}")
    z = torch.zeros_like(losses) if anchors is None else anchors.to(losses)
    gap = losses - z
    return alpha * torch.logsumexp(preference.to(losses) * (gap if signed else gap.abs()) / alpha, dim=0)


@dataclass(frozen=True)
class Scalarization:
    """A scalarisation ``(f, ρ, z, α) -> Ψ`` and whether it reads the anchors ``z_t`` and α
    (then :func:`~mergelab.adaptation.adapt` measures the anchors before the first step)."""

    fn: Callable[..., Tensor]
    anchored: bool


#: ``scalarization`` choices of every adaptive method (module docstring).
SCALARIZATIONS: dict[str, Scalarization] = {
    "sum": Scalarization(weighted_sum, anchored=False),
    "stch": Scalarization(smooth_tchebycheff, anchored=True),
    "stch_signed": Scalarization(partial(smooth_tchebycheff, signed=True), anchored=True),
}
