"""An adaptive merge method as the registry holds it: :class:`Adapter`.

A module of its own so that the adaptation loop (:mod:`mergelab.adaptation.loop`, which resolves a
:class:`~mergelab.adaptation.loop.Schedule` against a method's paper settings) and the registry
(:mod:`mergelab.adaptation`, which imports the loop) both read it without importing each other.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from mergelab.adaptation.models import CoefficientModel
from mergelab.errors import InputError
from mergelab.params import Interval, Param, params_of_function

__all__ = ["Adapter"]


@dataclass(frozen=True)
class Adapter:
    """An adaptive merge method: its builder, default objective and scalarisation, hyper-parameters,
    and the spaces its directions can be taken in (the builder's ``space`` hyper-parameter).

    ``basis``: the decomposition its bank is built on, for methods that take one (``bases=``): its kind
    in :data:`mergelab.adaptation.bank.DECOMPOSITIONS` (``"knots"``: the shared SVD, :func:`~mergelab.adaptation.bank.shared_svd`;
    ``"task_svd"``: :func:`~mergelab.adaptation.bank.task_svds`) and a map from hyper-parameters to that
    function's options (only those that change it). ``start``: the builder's hyper-parameter that
    sets the task-arithmetic coefficient the run starts from (``None``: it starts elsewhere), so a
    study can start every adaptive method from one λ (``adaptive_init``). ``start_grid``: for a
    configuration that starts elsewhere, the values of its starting hyper-parameters the paper
    chooses on validation data before adapting (``{}``: none), e.g. AdaRank-CART's λ (002 App. A).
    ``optimizer``: the paper's optimiser (``"adam"`` or ``"adamw"``).
    """

    build: Callable[..., CoefficientModel]
    objective: str = "entropy"
    scalarization: str = "sum"
    spaces: tuple[str, ...] = ("full",)
    basis: tuple[str, Callable[[Mapping[str, Any]], dict[str, Any]]] | None = None
    start: Callable[[Mapping[str, Any]], str | None] = lambda hp: "init"
    start_grid: Callable[[Mapping[str, Any]], dict[str, tuple[float, ...]]] = lambda hp: {}
    optimizer: str = "adam"
    intervals: Mapping[str, Interval] = field(default_factory=dict)

    @cached_property
    def settings(self) -> dict[str, Any]:
        """The builder's settings and their defaults: its keyword-only parameters but ``bases``."""
        return {p.name: p.default for p in inspect.signature(self.build).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "bases"}

    @cached_property
    def params(self) -> dict[str, Param]:
        """The settings whose type a :class:`~mergelab.params.Param` describes (checked at the edge)."""
        return {name: p for name, p in params_of_function(self.build, self.intervals, typed_only=True).items() if name != "bases"}

    def check(self, hp: Mapping[str, Any], owner: str) -> None:
        """InputError naming ``owner`` unless every setting in ``hp`` is one of :attr:`settings`, with
        a valid value where its type is known."""
        unknown = sorted(set(hp) - set(self.settings))
        if unknown:
            raise InputError(f"{owner} has no setting {unknown[0]!r}; allowed in hp: {', '.join(self.settings)}")
        for key, value in hp.items():
            if key in self.params:
                self.params[key].coerce(value, owner)
            elif key in self.ranges:
                _check_range(key, value, owner, optional=self.ranges[key])

    @cached_property
    def ranges(self) -> dict[str, bool]:
        """The settings annotated ``tuple[float, float]`` (a ``[low, high]`` range, such as AdaMerging's
        ``clamp``), each with whether ``None`` is allowed: checked at the edge by :func:`_check_range`."""
        hints = typing.get_type_hints(self.build)
        found = {}
        for name in self.settings:
            args = typing.get_args(hints.get(name))
            kinds = [a for a in args if a is not type(None)] if type(None) in args else [hints.get(name)]
            if kinds == [tuple[float, float]]:
                found[name] = type(None) in args
        return found

    def with_start(self, hp: Mapping[str, Any], value: float) -> dict[str, Any]:
        """``hp`` with the builder's starting coefficient set to ``value`` (``start(hp)`` names it:
        the λ of the task-arithmetic point every coefficient model starts from), unless ``hp`` sets
        it already or this configuration starts elsewhere (AdaRank's CART origin)."""
        name = self.start(hp)
        return dict(hp) if name is None or name in hp else {**hp, name: value}


def _check_range(key: str, value: Any, owner: str, *, optional: bool) -> None:
    """InputError unless ``value`` is ``[low, high]``: two finite numbers with ``low <= high`` (or ``None``
    where allowed)."""
    if value is None and optional:
        return
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not numbers or value[0] > value[1]:
        raise InputError(f"{owner}: {key}={value!r} is invalid; expected [low, high], two finite numbers with low <= high"
                         f"{' (or null: none)' if optional else ''}")
