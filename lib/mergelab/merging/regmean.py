"""RegMean (Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"; 001 Sec. 4 (i)), and the forward hooks that collect its Gram matrices.

For a linear layer ``y = W x`` RegMean solves ``min_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²`` per layer:
``W* = (Σ_t W_t G_t)(Σ_t G_t)⁻¹`` with ``G_t = X_tᵀ X_t / N_t`` the input Gram matrix of task
``t`` (PEFT orientation: ``W`` is ``(out, in)``, ``G`` is ``(in, in)``). Writing
``W_t = W_0 + τ_t`` gives the same formula on task updates (``W_0`` cancels), which is what is
merged here. In a space with input basis ``Q`` (core: ``V_A^ref``) the space hands over
``Qᵀ G_t Q``: the same least squares restricted to that subspace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.errors import InputError

__all__ = ["collect_input_grams", "regmean"]


def regmean(deltas: Sequence[Tensor], grams: Sequence[Tensor], *, alpha: float = 1.0, nondiag: float = 0.95) -> Tensor:
    """RegMean (Jin et al., 2023, Sec. 3; 001 Sec. 4 (i)): ``alpha · (Σ_t τ_t G'_t)(Σ_t G'_t)⁻¹`` with
    ``G' = diag(G) + nondiag · offdiag(G)``.

    ``nondiag`` is RegMean's off-diagonal reduction α (default 0.95, FusionBench
    ``reduce_non_diagonal_ratio``); it is applied to the Gram matrices this function receives
    (in core space: the projected ones). Solved with ``torch.linalg.solve`` in float64 (not an
    explicit inverse); a singular ``Σ_t G'_t`` raises InputError.
    """
    shrunk = []
    for G in grams:
        G = G.to(torch.float64)
        diag = torch.diag_embed(torch.diagonal(G))
        shrunk.append(diag + nondiag * (G - diag))
    total = torch.stack(shrunk).sum(dim=0)  # (in, in), symmetric
    rhs = sum(d.to(torch.float64) @ G for d, G in zip(deltas, shrunk, strict=True))  # (out, in)
    try:
        merged = torch.linalg.solve(total, rhs.T).T  # X Σ G = Σ τ G
    except torch.linalg.LinAlgError:
        raise InputError("regmean: the summed Gram matrix is singular; collect more calibration batches "
                         "or lower nondiag below 1") from None
    return (alpha * merged).to(deltas[0].dtype)


def _submodule(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module whose input a parameter sees, and how to read it (``linear`` / ``mha``)."""
    owner, _, param = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        raise InputError(f"collect_input_grams: the model has no module {owner!r} (for parameter {name!r})") from None
    if isinstance(module, nn.Linear) and param == "weight":
        return module, "linear"
    if isinstance(module, nn.MultiheadAttention) and param == "in_proj_weight":
        return module, "mha"
    raise InputError(f"collect_input_grams: {name!r} is not the weight of an nn.Linear or the in_proj_weight of an "
                     f"nn.MultiheadAttention ({type(module).__name__}); RegMean needs a linear map of the module's input")


def collect_input_grams(module: nn.Module, forward: Callable[[Any], Any], batches: Iterable[Any],
                        names: Sequence[str]) -> dict[str, Tensor]:
    """Input Gram matrices ``G = XᵀX / N`` (float64, ``in × in``) of the named parameters.

    Forward hooks record the input of each parameter's module while ``forward(batch)`` runs on
    every batch (no gradients); ``X`` stacks every input row (tokens × batch). ``names`` are
    parameter names: ``….weight`` of an ``nn.Linear``, or ``….in_proj_weight`` of a
    self-attention ``nn.MultiheadAttention`` (its query input). Raises InputError for a name
    whose module never runs: e.g. the ``out_proj`` of an ``nn.MultiheadAttention``, whose weight
    the attention uses directly without calling the module.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name] = sums.get(name, 0) + rows.T @ rows
        counts[name] = counts.get(name, 0) + rows.shape[0]

    handles = []
    try:
        for name in names:
            sub, kind = _submodule(module, name)
            if kind == "linear":
                hook = lambda _m, args, _out, name=name: record(name, args[0])  # noqa: E731
                handles.append(sub.register_forward_hook(hook))
            else:
                def mha_hook(_m, args, kwargs, name=name):
                    query = args[0] if args else kwargs["query"]
                    key = args[1] if len(args) > 1 else kwargs.get("key", query)
                    if key is not query:
                        raise InputError(f"collect_input_grams: {name!r} is a cross-attention (key is not the query); "
                                         "its packed projection sees two inputs")
                    record(name, query)
                handles.append(sub.register_forward_pre_hook(mha_hook, with_kwargs=True))
        with torch.no_grad():
            for batch in batches:
                forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    silent = [n for n in names if n not in sums]
    if silent:
        raise InputError(f"collect_input_grams: {len(silent)} modules never ran during forward (e.g. {silent[0]!r}); "
                         "an nn.MultiheadAttention calls its out_proj weight directly, so hooks cannot see its input")
    return {name: sums[name] / counts[name] for name in names}


def check_grams(grams: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """InputError unless every Gram matrix is ``in × in`` for its parameter."""
    for name, G in grams.items():
        n_in = shapes[name][1]
        if tuple(G.shape) != (n_in, n_in):
            raise InputError(f"regmean: Gram matrix of {name!r} has shape {tuple(G.shape)}, expected ({n_in}, {n_in}) "
                             "(the input dimension of the parameter)")
