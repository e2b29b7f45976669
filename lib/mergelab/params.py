"""Typed, validated options: hyper-parameters of merge methods and options of merge spaces.

A :class:`Param` is read off a function signature (or a dataclass) and its annotations:
``float``, ``int``, ``bool``, ``Literal[...]`` and ``X | None``, plus an optional
:class:`Interval`. :func:`resolve` turns user input (Python values or the strings of
``--set key=value``) into a complete, checked mapping, and raises
:class:`~mergelab.errors.InputError` naming the allowed names or values otherwise.

Structured settings (lists, mappings: a study's ``analysis_settings`` and ``adaptation_studies``)
are checked by :func:`check_setting` against their annotation, whose ``Annotated`` metadata may add
an :class:`Interval`, :class:`Tasks` (names of the study's tasks), :class:`PerTask` (one entry
per task) or :class:`Among` (names in a registry), so a study is checked whole when it loads, against its task set.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mergelab.errors import InputError

__all__ = ["Among", "Interval", "Layers", "Param", "PerTask", "Tasks", "check_setting", "first_repeated", "params_of_dataclass",
           "params_of_function", "resolve", "shown"]


@dataclass(frozen=True)
class Interval:
    """A numeric range; ``low_open`` / ``high_open`` exclude the end points."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        shown = lambda x: str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"  # noqa: E731  (2^63 - 1 whole)
        return f"{'(' if self.low_open else '['}{shown(self.low)}, {shown(self.high)}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Tasks:
    """``Annotated`` metadata of a setting that names tasks (``pair``, ``focal``, ``tasks``): each is
    one of the tasks the setting runs on, none twice, ``count`` of them when given, at least
    ``least``, and at least ``others`` tasks left over."""

    count: int | None = None
    least: int = 1
    others: int = 0


@dataclass(frozen=True)
class Among:
    """``Annotated`` metadata of a setting whose entries are names in ``choices`` (a registry, say
    :data:`~mergelab.adaptation.ADAPTERS`, whose lookup may also build a name, as ``METHODS["a+b"]``
    does); ``what`` names one in the message."""

    choices: Any
    what: str


@dataclass(frozen=True)
class Layers:
    """``Annotated`` metadata of a setting that names blocks of the model (``layers``): each must be a
    block the adapters change, which is known only once they are read (checked on a study's task set
    before any node runs: :func:`mergelab.experiments.registry.check_analysis_fits`)."""


@dataclass(frozen=True)
class PerTask:
    """``Annotated`` metadata of a setting with one entry per task the setting runs on (a preference)."""


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass(frozen=True)
class Param:
    """One named option: its type (``float``, ``int``, ``bool`` or a tuple of allowed strings),
    its default, whether ``None`` is allowed and its numeric range."""

    name: str
    kind: type | tuple[str, ...]
    default: Any
    optional: bool = False
    interval: Interval | None = None

    def describe(self) -> str:
        if isinstance(self.kind, tuple):
            text = "one of " + ", ".join(repr(c) for c in self.kind)
        else:
            text = self.kind.__name__ + (f" in {self.interval}" if self.interval else "")
        return text + (" or None" if self.optional else "")

    def coerce(self, value: Any, owner: str) -> Any:
        """The checked value; strings (from the CLI) are parsed according to the type."""
        bad = lambda: InputError(f"{owner}: {self.name}={value!r} is invalid; expected {self.describe()}")  # noqa: E731
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if self.optional:
                return None
            raise bad()
        if isinstance(self.kind, tuple):
            if value not in self.kind:
                raise bad()
            return value
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise bad()
        if isinstance(value, bool):
            raise bad()
        if self.kind is int:
            if isinstance(value, numbers.Integral):
                number: float = int(value)
            elif isinstance(value, str) and value.strip().lstrip("+-").isdecimal():  # what int() reads (isdigit: also ²)
                number = int(value)
            else:
                raise bad()
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise bad() from None
        if self.kind is float and not math.isfinite(number):
            raise bad()
        if self.interval is not None and number not in self.interval:
            raise bad()
        return number


def _param(name: str, annotation: Any, default: Any, interval: Interval | None) -> Param:
    optional = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"option {name!r}: unsupported annotation {annotation}")
        optional, annotation = True, rest[0]
    if typing.get_origin(annotation) is Literal:
        kind: type | tuple[str, ...] = tuple(typing.get_args(annotation))
    elif annotation in (float, int, bool):
        kind = annotation
    else:
        raise TypeError(f"option {name!r}: unsupported annotation {annotation}")
    return Param(name, kind, default, optional, interval)


def params_of_function(fn: Callable[..., Any], intervals: Mapping[str, Interval] | None = None, *,
                       typed_only: bool = False) -> dict[str, Param]:
    """The keyword-only parameters of ``fn`` (everything after ``*``) as Params. ``typed_only``
    skips parameters whose annotation is not one a Param describes (a tuple, a mapping of tensors)
    instead of raising: what can be checked of a builder's settings."""
    hints = typing.get_type_hints(fn)
    intervals = dict(intervals or {})
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}: hyper-parameter {p.name!r} needs a default")
        try:
            out[p.name] = _param(p.name, hints[p.name], p.default, intervals.pop(p.name, None))
        except TypeError:
            if not typed_only:
                raise
    if intervals:
        raise TypeError(f"{fn.__name__}: intervals for unknown parameters {sorted(intervals)}")
    return out


def params_of_dataclass(cls: type, intervals: Mapping[str, Interval] | None = None) -> dict[str, Param]:
    """The init fields of a dataclass as Params."""
    hints = typing.get_type_hints(cls)
    intervals = intervals or {}
    return {f.name: _param(f.name, hints[f.name], f.default, intervals.get(f.name))
            for f in dataclasses.fields(cls) if f.init}


def resolve(params: Mapping[str, Param], given: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Defaults overridden by ``given``; unknown names and bad values raise InputError."""
    unknown = sorted(set(given) - set(params))
    if unknown:
        allowed = ", ".join(f"{p.name} ({p.describe()})" for p in params.values()) or "none"
        raise InputError(f"{owner} has no option {', '.join(map(repr, unknown))}; allowed: {allowed}")
    return {name: (p.coerce(given[name], owner) if name in given else p.default) for name, p in params.items()}


def shown(hint: Any) -> str:
    """An annotation as a study author reads it: ``Sequence[int] | None`` -> ``list of int or None``."""
    if typing.get_origin(hint) is typing.Annotated:
        return shown(typing.get_args(hint)[0])
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(shown(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is not None and args and issubclass(origin, Mapping):
        return f"mapping of {shown(args[0])} to {shown(args[1])}"
    if origin is not None and args:
        return f"list of {shown(args[0])}"
    return "None" if hint is type(None) else "anything" if hint is Any else getattr(hint, "__name__", str(hint))


def first_repeated(items: Sequence[Any]) -> Any | None:
    """The first item of ``items`` that an earlier one equals (``None``: each is listed once)."""
    return next((item for i, item in enumerate(items) if item in items[:i]), None)


def _among(choices: Any, name: str) -> bool:
    """``name`` is one of ``choices``; a registry also knows the names it builds on lookup (``tsv+iso_c``)."""
    if name in choices:
        return True
    if not isinstance(choices, Mapping):
        return False
    try:
        choices[name]
    except (KeyError, InputError):
        return False
    return True


def check_setting(name: str, value: Any, hint: Any, owner: str, tasks: Sequence[str] | None) -> None:
    """Raise :class:`InputError` unless ``value`` fits the annotation ``hint`` (strictly: ``true`` is
    no number, ``"abc"`` no list) and its metadata (:class:`Interval`, :class:`Tasks`,
    :class:`PerTask`; the task rules only when the setting's ``tasks`` are known)."""
    from pydantic import TypeAdapter, ValidationError

    bad = lambda why: InputError(f"{owner}: {name}={value!r} is invalid; expected {shown(hint)} ({why})")  # noqa: E731
    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as err:
        raise bad(err.errors()[0]["msg"][:1].lower() + err.errors()[0]["msg"][1:]) from None
    if value is None or typing.get_origin(hint) is not typing.Annotated:
        return
    for rule in typing.get_args(hint)[1:]:
        if isinstance(rule, Interval):  # a number, or each number of a list
            if isinstance(value, list | tuple) and not all(isinstance(v, numbers.Real) and v in rule for v in value):
                raise bad(f"numbers in {rule}")
            if not isinstance(value, list | tuple) and not (isinstance(value, numbers.Real) and value in rule):
                raise bad(f"a number in {rule}")
        if isinstance(rule, Tasks) and tasks is not None:
            unknown = [t for t in value if t not in tasks]
            if unknown:
                raise bad(f"{unknown[0]!r} is not one of the tasks {', '.join(tasks)}")
            if len(set(value)) != len(value):
                raise bad("a task is named twice")
            if (rule.count is not None and len(value) != rule.count) or len(value) < rule.least:
                raise bad(f"name {rule.count if rule.count is not None else f'at least {rule.least}'} of the tasks")
            if len(tasks) - len(value) < rule.others:
                raise bad(f"it leaves {len(tasks) - len(value)} of the {len(tasks)} tasks, at least {rule.others} must remain")
        if isinstance(rule, Among):
            unknown = [v for v in ([value] if isinstance(value, str) else value) if not _among(rule.choices, v)]
            if unknown:
                raise bad(f"{unknown[0]!r} is not among the {rule.what}s: {', '.join(rule.choices)}")
        if isinstance(rule, PerTask) and tasks is not None and len(value) != len(tasks):
            raise bad(f"{len(value)} entries for {len(tasks)} tasks ({', '.join(tasks)}); give one per task")
