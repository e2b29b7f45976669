"""The method registry: what a merge method needs, its hyper-parameters, and compositions.

A registry entry (:class:`MergeMethod`) is the pure function plus declarations the merge
driver reads; the function itself never learns which space it runs in:

* ``inputs``: what the function receives per module —
  ``"tensors"`` (same-shape tensors of any rank: element-wise methods, which therefore also
  run on a whole-model vector when the space's ``scope`` is ``"model"``, and on non-matrix
  parameters), ``"matrices"`` (2-D matrices; always per module), or ``"factors"``
  (``LowRank(B_t, A_t)`` per task, in the space's coordinates; needs LoRA inputs).
* ``side``: names of per-task, per-module side inputs the function takes positionally after
  the task list (``("grams",)`` for RegMean, ``("norms",)`` for MetaGPT / NormAvg, ``("scalings",)``
  for Linear);
  :data:`SIDE_INPUTS` says how each kind is checked and mapped into a space (Gram matrices:
  :meth:`Space.gram`) or, for a derived one, how the driver computes it from the task set (the
  true update norms), so that no space changes what the method sees. A method with a side input
  always runs per module (never model-wide).
* ``nonmatrix``: the rule for parameters that are not matrices (Dense updates with
  ``ndim != 2``: biases, norms): ``"self"`` (the method itself, element-wise methods),
  ``"mean"`` (``alpha · mean``, as TSV-M / Iso / RegMean / CART originals) or ``"sum"``
  (``alpha · sum``, as task arithmetic). They are never projected into a space.
* ``post``: whether the method means something on a single, already merged matrix, so that it may
  follow ``+`` (isotropize, truncate, trim, drop). Methods that need several tasks to act
  (``consensus`` zeroes a single input, ``cart`` / ``normavg`` / ``metagpt`` / ``average`` / ``tsv``
  return it unchanged, ``task_arithmetic`` only rescales it) are refused there.
* ``isometric``: the method is defined by the singular values of the update itself (Iso-C
  flattens them, the SVD of the sum truncates them); in a space whose left map is not an
  isometry (KnOTS ``per_layer``) the driver hands it the isometric coordinates
  (:meth:`Context.isometric`) and maps its result back.
* ``frame``: the method takes ``frame=``, the identity of the weight's own coordinates expressed in
  the space's (:meth:`Context.frame`), to complete zero singular directions the same way in every
  space (:mod:`mergelab.merging.completion`); never a hyper-parameter.
* ``factored``: the method also takes a task's matrix as its LowRank factors, where the space
  represents it so (Core's ``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)``, 003 Eq. 8), and uses them (TSV-M's
  per-task SVDs); every other method gets the product.
* ``grid``: the hyper-parameter grid searched by selection.
* ``intervals``: allowed ranges; types and defaults come from the function's signature.

What the conformance suite (:mod:`mergelab.conformance`) checks of the method besides what every
method passes (finite full-space shapes, inputs never mutated, same seed same merge):

* ``identity``: the hyper-parameters under which merging a single task returns that task, in every
  lossless space (``None``: the method changes even one task by design, as Iso-C flattens its
  spectrum).
* ``stochastic``: the merge draws random numbers from its ``seed`` (DARE's drops), so another seed
  gives another merge.
* ``linear``: the merge is a combination ``Σ_t c_t ΔW_t`` whose weights no space changes, so it gives
  the same update in every lossless space (003 Eq. 11).

A name with ``+`` (``"tsv+iso_c"``) is a :class:`Composition`: the first method merges, every
later one post-processes the single merged matrix (``iso_c`` then isotropizes it: 003's
``+Iso-C``). Its hyper-parameters are ``"<method>.<name>"``; an unprefixed name goes to the
last stage that has it. The inner stages' ``alpha`` defaults to 1, so the last stage's ``alpha``
is the composition's only scaling, as 003 Tab. 7's α (task arithmetic's own default of 0.3 would
otherwise hide a factor 0.3 inside ``task_arithmetic+iso_c``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from torch import Tensor

from mergelab.errors import InputError
from mergelab.merging.arithmetic import group_norms
from mergelab.merging.lora import lora_scalings
from mergelab.merging.regmean import check_grams
from mergelab.params import Interval, Param, first_repeated, params_of_function, resolve
from mergelab.registry import Registry
from mergelab.spaces import Context, Space
from mergelab.taskset import LowRank, TaskSet

__all__ = ["SIDE_INPUTS", "Composition", "MergeMethod", "MethodRegistry", "SideInput"]

InputKind = Literal["tensors", "matrices", "factors"]
NonMatrixRule = Literal["self", "mean", "sum"]


@dataclass(frozen=True)
class SideInput:
    """A kind of per-task, per-module side input: how it is checked against the parameters'
    shapes (a user-given one), and how a space maps it into its coordinates. ``derive``: for side
    inputs the driver computes itself, ``(taskset, stage hyper-parameters) -> {module: [per-task
    tensor]}`` (every module, matrix or not); the user then never passes it."""

    to_space: Callable[[Space, Tensor, Context], Tensor]
    check: Callable[[Mapping[str, Tensor], Mapping[str, tuple[int, ...]]], None] | None = None
    derive: Callable[[TaskSet, Mapping[str, Any]], Mapping[str, list[Tensor]]] | None = None


#: The side inputs a method may declare in ``MergeMethod.side``.
SIDE_INPUTS: dict[str, SideInput] = {
    "grams": SideInput(check=check_grams, to_space=lambda space, gram, ctx: space.gram(gram, ctx)),
    "norms": SideInput(to_space=lambda space, norm, ctx: norm, derive=lambda taskset, hp: group_norms(taskset, hp["group"])),
    "scalings": SideInput(to_space=lambda space, scaling, ctx: scaling, derive=lambda taskset, hp: lora_scalings(taskset)),
}


@dataclass(frozen=True, eq=False)
class MergeMethod:
    """One merge method: ``fn(per_task, *side, **hp) -> Tensor | LowRank`` and its declarations."""

    fn: Callable[..., Tensor | LowRank]
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    inputs: InputKind = "matrices"
    side: tuple[str, ...] = ()
    nonmatrix: NonMatrixRule = "mean"
    intervals: Mapping[str, Interval] = field(default_factory=dict)
    post: bool = False
    isometric: bool = False
    frame: bool = False
    factored: bool = False
    feasible: Callable[[TaskSet, Mapping[str, Any]], None] | None = None
    identity: Mapping[str, Any] | None = None
    stochastic: bool = False
    linear: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        params = self.params
        if "alpha" not in params:
            raise TypeError(f"{self.fn.__name__}: every merge method takes the global scaling 'alpha'")
        unknown = [name for name in self.side if name not in SIDE_INPUTS]
        if unknown:
            raise TypeError(f"{self.fn.__name__}: unknown side input {unknown[0]!r}; known: {sorted(SIDE_INPUTS)}")
        if self.isometric and self.inputs == "factors":
            raise TypeError(f"{self.fn.__name__}: a method of LoRA factors has no spectrum to keep isometric")
        if self.nonmatrix == "self" and self.inputs != "tensors":
            raise TypeError(f"{self.fn.__name__}: only element-wise ('tensors') methods can merge non-matrix parameters themselves")
        if self.stochastic and "seed" not in params:
            raise TypeError(f"{self.fn.__name__}: a stochastic method takes a 'seed'")
        unknown = sorted(set(self.identity or {}) - set(params))
        if unknown:
            raise TypeError(f"{self.fn.__name__}: identity names unknown hyper-parameter {unknown[0]!r}")
        for key, values in self.grid.items():
            if key not in params:
                raise TypeError(f"{self.fn.__name__}: grid names unknown hyper-parameter {key!r}")
            for value in values:
                params[key].coerce(value, self.fn.__name__)

    @cached_property
    def params(self) -> dict[str, Param]:
        return params_of_function(self.fn, self.intervals)

    @property
    def stages(self) -> tuple[tuple[str, MergeMethod], ...]:
        return ((self.name, self),)

    def resolve(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        """All hyper-parameters: defaults overridden by ``hp``, validated (InputError otherwise)."""
        return resolve(self.params, hp, f"method {self.name!r}")

    def stage_values(self, values: Mapping[str, Any], stage: str) -> dict[str, Any]:
        return dict(values)


def check_feasible(method: MergeMethod | Composition, taskset: TaskSet, hp: Mapping[str, Any]) -> None:
    """InputError when a resolved configuration ``hp`` cannot merge ``taskset``: a bound that depends
    on the adapters (``MergeMethod.feasible``, e.g. LoRA-LEGO's ``k <= Σ_t r_t``), checked by a study
    before any node merges; the message starts with the stage's method name."""
    single = len(method.stages) == 1
    for part, stage in method.stages:
        if stage.feasible is not None:
            try:
                stage.feasible(taskset, hp if single else {k.split(".", 1)[1]: v for k, v in hp.items() if k.startswith(f"{part}.")})
            except InputError as err:
                raise InputError(f"{part}: {err}") from None


@dataclass(frozen=True, eq=False)
class Composition:
    """``"a+b+…"``: ``a`` merges, each later method post-processes the merged matrix."""

    name: str
    parts: tuple[tuple[str, MergeMethod], ...]
    #: the registry's methods that may follow ``+`` (:attr:`MergeMethod.post`), named when a part may not
    post_processors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        repeated = first_repeated([part for part, _ in self.parts])
        if repeated is not None:  # its stages' hyper-parameters would share one name (ties.density)
            raise InputError(f"method {self.name!r} names {repeated!r} twice, whose stages would share the settings {repeated}.<name>; "
                             "compose distinct methods (each at most once)")
        for part, method in self.parts[1:]:
            if method.inputs == "factors" or method.side:
                need = "LoRA factors" if method.inputs == "factors" else f"side inputs ({', '.join(method.side)})"
                raise InputError(f"method {self.name!r}: {part!r} needs {need} and cannot post-process a merged matrix; "
                                 "only methods of matrices or tensors may follow '+'")
            if not method.post:
                raise InputError(f"method {self.name!r}: {part!r} leaves a single merged matrix unchanged, rescaled or zero, "
                                 f"so it cannot follow '+'; post-processors: {', '.join(self.post_processors)}")

    @property
    def stages(self) -> tuple[tuple[str, MergeMethod], ...]:
        return self.parts

    @property
    def inputs(self) -> InputKind:
        return self.parts[0][1].inputs

    @property
    def side(self) -> tuple[str, ...]:
        return self.parts[0][1].side

    @cached_property
    def params(self) -> dict[str, Param]:
        """Every stage's hyper-parameters, prefixed; an inner stage's ``alpha`` defaults to 1 (module docstring)."""
        last = len(self.parts) - 1
        return {f"{part}.{key}": replace(p, name=f"{part}.{key}", **({"default": 1.0} if key == "alpha" and i < last else {}))
                for i, (part, m) in enumerate(self.parts) for key, p in m.params.items()}

    @property
    def grid(self) -> dict[str, tuple[Any, ...]]:
        """Every stage's grid, prefixed; the inner stages' ``alpha`` is left at 1 because the
        post-processors are positively homogeneous (the last ``alpha`` scales the result)."""
        last = len(self.parts) - 1
        return {f"{part}.{key}": values for i, (part, m) in enumerate(self.parts)
                for key, values in m.grid.items() if key != "alpha" or i == last}

    def _qualify(self, key: str) -> str:
        if key in self.params or "." in key:
            return key
        owners = [part for part, m in self.parts if key in m.params]
        return f"{owners[-1]}.{key}" if owners else key

    def resolve(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        qualified = {self._qualify(k): v for k, v in hp.items()}
        if len(qualified) != len(hp):
            raise InputError(f"method {self.name!r}: a hyper-parameter is given twice (prefixed and unprefixed): {sorted(hp)}")
        return resolve(self.params, qualified, f"method {self.name!r}")

    def stage_values(self, values: Mapping[str, Any], stage: str) -> dict[str, Any]:
        prefix = f"{stage}."
        return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}

    def fn(self, per_task, *side, **hp) -> Tensor | LowRank:
        """Apply the stages in order on plain per-task inputs (no space)."""
        values = self.resolve(hp)
        out: Tensor | LowRank | None = None
        for i, (part, method) in enumerate(self.parts):
            args = (per_task, *side) if i == 0 else ([out.dense() if isinstance(out, LowRank) else out],)
            out = method.fn(*args, **self.stage_values(values, part))
        return out


class MethodRegistry(Registry[MergeMethod]):
    """The :class:`~mergelab.registry.Registry` of merge methods; ``registry["a+b"]`` builds the
    :class:`Composition`, and an unknown name raises InputError listing the known ones."""

    def __init__(self, methods: Mapping[str, MergeMethod]) -> None:
        super().__init__("merge method", methods, hint=" or compose them with '+' (e.g. tsv+iso_c)")

    def __setitem__(self, name: str, method: MergeMethod) -> None:
        if "+" in name or not name:
            raise ValueError(f"method name {name!r} must be non-empty and must not contain '+'")
        super().__setitem__(name, replace(method, name=name))

    def __missing__(self, name: str) -> Composition:
        parts = name.split("+")
        unknown = [p for p in parts if p not in self]
        if unknown or len(parts) < 2:
            raise InputError(f"unknown merge method {unknown[0] if unknown else name!r}; allowed: {', '.join(self)}{self.hint}")
        return Composition(name, tuple((p, dict.__getitem__(self, p)) for p in parts),
                           tuple(n for n, m in self.items() if m.post))
