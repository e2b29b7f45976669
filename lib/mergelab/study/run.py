"""What every node of a study shares: the jobs it plans, the node kind and result types, and the :class:`Run`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any


from mergelab.adaptive_spec import AdaptiveSpec
from mergelab.bases import Bases, space_bases
from mergelab.bench import Bench, BenchSession, load_bench
from mergelab.config import StudySpec, config_label
from mergelab.merging import METHODS
from mergelab.profiling import trim_heap
from mergelab.store import Store
from mergelab.store_format import Key, Kind
from mergelab.taskset import TaskSet

#: The pseudo-task holding the joint-task metrics (Hits@k over the union of labels).
JOINT = "joint"
#: Metrics per task: test accuracy and its normalised value, the same on val, TAS on val.
TASK_METRICS = ("acc", "norm_acc", "val_acc", "val_norm_acc", "tas", "val_entropy")
JOINT_KS = (1, 3, 5)


@dataclass(frozen=True)
class NodeResult:
    """What one node did: its kind, its content key, whether the store already had it, and a label."""

    node: str
    key: str
    hit: bool
    label: str = ""


def _no_refs(ctx: Run, key: Key, *args: Any) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Node:
    """One kind of study node: its name, code version, content key and computation.

    ``key(ctx, *args)`` builds the content key from keys and hashes only (it never reads an artifact
    or runs a model), so :meth:`probe` answers whether a node is done without computing anything.
    ``compute(ctx, key, *args, **options)`` returns the value to publish as ``artifact`` and its
    attrs; ``refs(ctx, key, *args)`` names artifacts for humans (``studies/<name>/results``);
    ``label(ctx, *args)`` says which node it is in progress bars. ``version`` is bumped when the
    output changes for the same inputs (``None``: the registry entry's version, as for analyses).
    """

    kind: str
    version: str | None
    artifact: Kind
    key: Callable[..., Key]
    compute: Callable[..., tuple[Any, Mapping[str, Any]]]
    label: Callable[..., str]
    refs: Callable[..., Mapping[str, str]] = _no_refs

    def __call__(self, ctx: Run, *args: Any, **options: Any) -> NodeResult:
        """Run the node: publish its artifact unless the store has it, then set its refs."""
        key = self.key(ctx, *args)
        hit = ctx.store.exists(key)
        if not hit:
            start = time.perf_counter()
            value, attrs = self.compute(ctx, key, *args, **options)
            ctx.store.put(key, self.artifact, value, {"compute_time_s": round(time.perf_counter() - start, 6), **attrs})
            del value
            trim_heap()  # a model-sized result (a full-space merge of an LLM) leaves no high-water mark behind
        self.name(ctx, key, *args)
        return NodeResult(self.kind, key, hit, self.label(ctx, *args))

    def probe(self, ctx: Run, *args: Any) -> NodeResult | None:
        """The node's result if its artifact is in the store, else ``None``; nothing is computed or named."""
        key = self.key(ctx, *args)
        return NodeResult(self.kind, key, True, self.label(ctx, *args)) if ctx.store.exists(key) else None

    def name(self, ctx: Run, key: Key, *args: Any) -> None:
        """Point the node's refs at its artifacts."""
        for ref, target in self.refs(ctx, key, *args).items():
            ctx.store.set_ref(ref, target)


@dataclass(frozen=True)
class MergeJob:
    """One static merge of the sweep: method × space × configuration (× seed for stochastic methods)."""

    method: str
    space: str
    config: dict[str, Any]
    seed: int | None = None

    @property
    def label(self) -> str:
        return f"{self.method}/{self.space}/{config_label(self.config)}" + ("" if self.seed is None else f"/seed={self.seed}")


@dataclass(frozen=True)
class AdaptJob:
    """One adaptive run: its spec and seed."""

    spec: AdaptiveSpec
    seed: int

    @property
    def label(self) -> str:
        return f"{self.spec.name}/seed={self.seed}"



# The run a node belongs to --------------------------------------------------------------------------


class Run:
    """One run of a study in one process: its spec, store and lazily loaded benchmark session,
    shared by the nodes (each node's ``ctx``).

    ``bench`` overrides the benchmark the spec describes (``mergelab merge --select`` evaluates
    the user's adapters on a benchmark's tasks).
    """

    def __init__(self, spec: StudySpec, store_url: str, bench: Bench | None = None) -> None:
        from mergelab.model.placement import resolve_device

        resolve_device(spec.device)  # a device this machine lacks fails before anything runs
        self.spec = spec
        self.store = Store(store_url)
        self._given_bench = bench
        self._lock = threading.RLock()
        self._local = threading.local()
        self._bases: dict[str, Bases | None] = {}
        self._bases_lock = threading.Lock()

    @cached_property
    def bench(self) -> Bench:
        with self._lock:
            return self._placed(self._given_bench or load_bench(self.spec.bench, self.spec.tasks))

    def _placed(self, bench: Bench) -> Bench:
        """``bench`` with its encoder on the study's device and dtype (:func:`mergelab.model.placement.placed`);
        a dtype other than float32 enters ``data_id``, so its scores are stored apart."""
        from mergelab.model.placement import placed

        backbone = placed(bench.backbone, self.spec.device, self.spec.dtype)
        if backbone is bench.backbone:  # the CPU in float32: nothing to place
            return bench
        return replace(bench, backbone=backbone, dtype=self.spec.dtype)

    @cached_property
    def session(self) -> BenchSession:
        """The bench's :class:`~mergelab.bench.BenchSession`, shared by this run's nodes."""
        with self._lock:
            return BenchSession(self.bench)

    @cached_property
    def eval_session(self) -> BenchSession:
        """The session evaluations run on: the study's tasks and then its ``unseen`` ones (the
        merges' own session when there are none)."""
        with self._lock:
            return BenchSession(self._placed(load_bench(self.spec.bench, self.spec.evaluated))) if self.spec.unseen else self.session

    @property
    def local_session(self) -> BenchSession:
        """The (warmed) session with this thread's own copy of the backbone.

        A functional forward swaps the module's parameters while it runs, so two threads must
        never run one module at once; each worker thread gets a private copy instead. Nodes whose
        artifact is already stored never ask for it, so a cached rerun skips the data entirely.
        """
        return self._thread_copy("session")

    @property
    def local_eval_session(self) -> BenchSession:
        """:attr:`eval_session` with this thread's own copy of the backbone (see :attr:`local_session`)."""
        return self._thread_copy("eval_session") if self.spec.unseen else self.local_session

    def _thread_copy(self, name: str) -> BenchSession:
        if getattr(self._local, name, None) is None:
            with self._lock:
                shared = getattr(self, name)
                shared.warm()
                setattr(self._local, name, shared.for_thread())
        return getattr(self._local, name)

    @property
    def taskset(self) -> TaskSet:
        return self.session.taskset

    def space_bases(self, space: str) -> Bases | None:
        """The task set's bases for ``space`` (:func:`mergelab.bases.space_bases`), read from the
        store, or computed and published, once per run's merges rather than once per merge."""
        with self._bases_lock:
            if space not in self._bases:
                self._bases[space] = space_bases(self.store, self.taskset, space)
            return self._bases[space]

    def release_bases(self) -> None:
        """Drop the bases :meth:`space_bases` keeps once the merges are done (nothing after them projects):
        the evaluations do not hold them beside the model (0.6 GiB of KnOTS bases for a Llama-3.2-1B)."""
        with self._bases_lock:
            self._bases.clear()


_RUNS: dict[tuple[str, str, str], Run] = {}
_RUNS_LOCK = threading.Lock()
#: Runs kept per process (older ones are dropped: a new run re-reads its checkpoints).
_KEEP = 2


def shared_run(spec: StudySpec, store_url: str, run: str = "") -> Run:
    """The :class:`Run` of ``spec`` against ``store_url`` that ``run`` (an id) names.

    Nodes of the same run in the same process share it; a new run loads the checkpoints again,
    so adapters changed on disk between scheduled runs are seen.
    """
    ident = (spec.model_dump_json(), store_url, run)
    with _RUNS_LOCK:
        if ident not in _RUNS:
            _RUNS[ident] = Run(spec, store_url)
            while len(_RUNS) > _KEEP:
                _RUNS.pop(next(iter(_RUNS)))
        return _RUNS[ident]



# Planning ------------------------------------------------------------------------------------------


def _stochastic(method: str) -> bool:
    return any(name.rsplit(".", 1)[-1] == "seed" for name in METHODS[method].params)


def merge_jobs(spec: StudySpec) -> list[MergeJob]:
    """Every static merge of the study: methods × spaces × grid configurations (× seeds if stochastic)."""
    jobs = []
    for m in spec.methods:
        seeds: Sequence[int | None] = spec.seeds if _stochastic(m.method) else [None]
        jobs += [MergeJob(m.method, space, config, seed) for space in m.spaces for config in m.configs() for seed in seeds]
    return jobs


def adapt_jobs(spec: StudySpec) -> list[AdaptJob]:
    """Every adaptive run: adaptive specs × seeds, each started from the study's ``adaptive_init``
    (written into its ``hp``, hence its key and label) when the study sets one."""
    from mergelab.adaptation import ADAPTERS

    def started(a: AdaptiveSpec) -> AdaptiveSpec:
        if spec.adaptive_init is None:
            return a
        return a.model_copy(update={"hp": ADAPTERS[a.method].with_start(a.hp, spec.adaptive_init)})

    return [AdaptJob(started(a), seed) for a in spec.adaptive for seed in spec.seeds]
