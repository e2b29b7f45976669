"""The ranks serving engines accept for a LoRA adapter, and ``--max-rank`` read against them.

An engine that serves many adapters preallocates its LoRA buffers at one rank and accepts only a
few: vLLM's ``--max-lora-rank`` takes one of :data:`SERVING_RANKS` ``["vllm"]`` (its
``LoRAConfig.max_lora_rank`` check) and serves adapters of any rank up to it. ``--max-rank`` is an
integer (a cap) or an engine's name, optionally with a cap (``vllm``, ``vllm:64``); :func:`parse_max_rank`
reads it once, at the edge, into a :class:`RankCap`, and :meth:`RankCap.resolve` gives the rank to cap
the merged adapter at:

| ``--max-rank`` | rank | adapter |
|---|---|---|
| ``R`` | ``R`` (a warning names the engines that do not accept it) | modules above ``R`` truncated |
| ``vllm`` | the smallest allowed rank ``≥`` the merged rank (the largest allowed when none is) | exact unless the merge exceeds 512 |
| ``vllm:C`` | that, but at most the largest allowed rank ``≤ C`` | modules above it truncated |

The merged rank is the largest rank of a matrix module (a dense one counts as full rank).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergelab.errors import InputError
from mergelab.registry import Registry

if TYPE_CHECKING:
    from mergelab.taskset import TaskSet

__all__ = ["SERVING_RANKS", "RankCap", "parse_max_rank", "serving_rank"]

#: Engine -> the ``max_lora_rank`` values it accepts, ascending (vLLM: ``vllm/config/lora.py``).
SERVING_RANKS: Registry[tuple[int, ...]] = Registry("serving engine", {"vllm": (1, 8, 16, 32, 64, 128, 256, 320, 512)},
                                                    hint="; --max-rank also takes an integer rank")


def serving_rank(merged_rank: int, allowed: Sequence[int], cap: int | None = None) -> int:
    """The rank of ``allowed`` (ascending) to serve a merge of rank ``merged_rank`` at: the smallest
    one ``≥ merged_rank`` (the largest when none is), and at most the largest one ``≤ cap``."""
    rank = next((r for r in allowed if r >= merged_rank), allowed[-1])
    if cap is not None:
        rank = min(rank, max(r for r in allowed if r <= cap))
    return rank


@dataclass(frozen=True)
class RankCap:
    """``--max-rank`` read: a cap ``rank``, an ``engine`` whose allowed ranks decide, or both (the engine's
    largest allowed rank ``≤ rank`` bounds its choice)."""

    rank: int | None = None
    engine: str | None = None

    def resolve(self, merged_rank: int) -> int:
        """The rank to cap a merge of rank ``merged_rank`` at (module docstring's table)."""
        if self.engine is None:
            assert self.rank is not None
            return self.rank
        return serving_rank(merged_rank, SERVING_RANKS[self.engine], self.rank)

    def check_binds(self, taskset: TaskSet) -> None:
        """An integer cap must bind on ``taskset``: below some matrix module's ``min(out, in)``; then one
        warning per engine that would not accept it (:meth:`warn_unservable`, naming the caller's caller)."""
        if self.engine is not None:
            return
        bound = max((min(u.shape) for t in taskset.tasks for u in t.modules.values() if len(u.shape) == 2), default=0)
        if self.rank > bound:  # type: ignore[operator]
            raise InputError(f"--max-rank {self.rank} is above every module's min(out, in) (at most {bound}), so it caps nothing; "
                             f"give a rank below {bound} or a serving engine (--max-rank vllm), or drop --max-rank")
        self.warn_unservable(stacklevel=4)

    def warn_unservable(self, stacklevel: int = 3) -> None:
        """One warning per engine of :data:`SERVING_RANKS` that does not accept this integer cap."""
        for name, allowed in SERVING_RANKS.items() if self.engine is None else ():
            if self.rank not in allowed:
                serves = (f"it serves the adapter with max_lora_rank {serving_rank(self.rank, allowed)}"  # type: ignore[arg-type]
                          if self.rank <= allowed[-1] else f"it serves no adapter above rank {allowed[-1]}")  # type: ignore[operator]
                warnings.warn(f"--max-rank {self.rank} is not a max_lora_rank {name} accepts ({', '.join(map(str, allowed))}): {serves}; "
                              f"--max-rank {name} picks from that set", UserWarning, stacklevel=stacklevel)

    def describe(self) -> str:
        """The ``--max-rank`` value this was read from (``16``, ``vllm``, ``vllm:64``)."""
        return str(self.rank) if self.engine is None else self.engine + ("" if self.rank is None else f":{self.rank}")


def parse_max_rank(value: str | int, *, warn: bool = True) -> RankCap:
    """``--max-rank``: an integer ``>= 1``, an engine of :data:`SERVING_RANKS` or ``ENGINE:CAP``. An integer
    that an engine does not accept warns (one line naming what that engine would take;
    :meth:`RankCap.warn_unservable`, which ``warn=False`` leaves to the caller)."""
    text = str(value).strip()
    if not text:
        raise InputError("--max-rank is empty; give an integer >= 1, an engine "
                         f"({', '.join(SERVING_RANKS)}) or ENGINE:CAP such as vllm:64")
    engine, colon, cap = ("", "", text) if text.isdecimal() else text.partition(":")
    if colon and not (engine and cap):  # "vllm:" (an unset $CAP) or ":64" is not read as the engine's or an integer cap
        raise InputError(f"--max-rank {text!r} has an empty {'cap after' if engine else 'engine before'} ':'; give ENGINE:CAP "
                         f"such as vllm:64, an engine alone ({', '.join(SERVING_RANKS)}) or an integer >= 1")
    if engine:
        SERVING_RANKS.require(engine)
    if cap and not (cap.isdecimal() and int(cap) >= 1):
        raise InputError(f"--max-rank {text!r} is not a rank; give an integer >= 1, an engine ({', '.join(SERVING_RANKS)}) "
                         "or ENGINE:CAP such as vllm:64")
    rank = int(cap) if cap else None
    if engine and rank is not None and rank < SERVING_RANKS[engine][0]:
        raise InputError(f"--max-rank {text}: {engine} accepts no rank <= {rank} (its smallest is {SERVING_RANKS[engine][0]}); raise the "
                         "cap")
    cap = RankCap(rank, engine or None)
    if warn:
        cap.warn_unservable()
    return cap
