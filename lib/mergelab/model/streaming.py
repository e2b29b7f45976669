"""A forward with replaced parameters formed one repeated block at a time, never all at once.

A merged model is the base with ``W_0 + ΔW`` in place of every adapted matrix (001 Eq. 1, 003 Eq. 2). Formed
for the whole encoder before a forward, as ``torch.func.functional_call`` takes them, those matrices are a
second copy of nearly the whole model: 3.6 GiB of a Llama-3.2-1B's 4.6 GiB, with every linear layer of
every block adapted. :class:`StreamedParams` forms a parameter only when it is read, and
:func:`streamed_call` reads each repeated block's (a transformer layer: a child of an ``nn.ModuleList`` or
``nn.Sequential``) when that block starts and drops them when it ends, so a forward holds one block's
replaced weights beside the model. Each is swapped into its module's slot as ``functional_call`` swaps
it (the base weights are never written, so threads with their own module copies share them), and the
same tensors reach the same operations: the outputs are ``functional_call``'s with every tensor formed
up front, bit for bit. The price is forming them again in every forward (one per batch).

A parameter outside every repeated block, or tied to another name (one tensor under two names, each of
which takes the replacement as with ``functional_call``'s ``tie_weights``), is swapped in for the whole
forward. A block only reads its own parameters in the architectures here (q, k, v, out and the MLP of
a layer; ``nn.MultiheadAttention`` reads its ``out_proj``'s weight itself, inside its layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from itertools import chain
from typing import Any

from torch import Tensor, nn

from mergelab.lazy_mapping import LazyMapping

__all__ = ["StreamedParams", "streamed_call"]


class StreamedParams(LazyMapping[Tensor]):
    """Replacement parameters by name, each formed by ``make(name)`` whenever it is read and never kept."""

    def then(self, fn: Callable[[Tensor], Tensor]) -> StreamedParams:
        """The same parameters passed through ``fn`` as they are formed (e.g. moved to a device)."""
        make = self._make
        return StreamedParams(self._names, lambda name: fn(make(name)))


def _block_of(name: str, containers: set[str]) -> str:
    """The outermost repeated block holding parameter ``name`` (its ancestor module whose parent is a
    container), ``""`` when none."""
    parts = name.split(".")
    return next((".".join(parts[:i + 1]) for i in range(len(parts) - 1) if ".".join(parts[:i]) in containers), "")


def _swap(module: nn.Module, values: Mapping[str, Tensor]) -> list[tuple[dict, str, Any]]:
    """Put each tensor of ``values`` in its parameter's (or buffer's) slot; what was there, to put back."""
    saved = []
    for name, value in values.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        slots = owner._parameters if attr in owner._parameters else owner._buffers
        saved.append((slots, attr, slots[attr]))
        slots[attr] = value
    return saved


def _restore(saved: list[tuple[dict, str, Any]]) -> None:
    for slots, attr, old in reversed(saved):
        slots[attr] = old


@contextlib.contextmanager
def _streamed(module: nn.Module, params: StreamedParams) -> Iterator[None]:
    """Inside, each repeated block of ``module`` runs with its parameters of ``params`` in place (formed at
    the block's start, dropped at its end) and the others are in place throughout (module docstring)."""
    containers = {name for name, m in module.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}
    tensors = dict(chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)))
    names_of: dict[int, list[str]] = {}
    for name, t in tensors.items():
        names_of.setdefault(id(t), []).append(name)
    blocks: dict[str, list[str]] = {}
    for name in params:
        tied = len(names_of[id(tensors[name])]) > 1
        blocks.setdefault("" if tied else _block_of(name, containers), []).append(name)
    saved: dict[str, list[list]] = {block: [] for block in blocks}

    def enter(block: str) -> None:
        values: dict[str, Tensor] = {}
        for name in blocks[block]:
            values.update(dict.fromkeys(names_of[id(tensors[name])], params[name]))
        saved[block].append(_swap(module, values))

    def leave(block: str) -> None:
        if saved[block]:  # empty when forming the block's parameters failed
            _restore(saved[block].pop())

    handles = []
    try:
        for block in blocks.keys() - {""}:
            sub = module.get_submodule(block)
            handles.append(sub.register_forward_pre_hook(lambda _m, _args, b=block: enter(b)))
            handles.append(sub.register_forward_hook(lambda _m, _args, _out, b=block: leave(b), always_call=True))
        if "" in blocks:
            enter("")
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in saved.values():
            while stack:
                _restore(stack.pop())


def streamed_call(module: nn.Module, params: StreamedParams, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with ``params`` swapped in a repeated block at a time (module docstring)."""
    with _streamed(module, params):
        return module(*args, **kwargs)
