"""What every node of a study shares: the jobs it plans, the results it returns, and the run context."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any


from mergelab.bases import Bases, space_bases
from mergelab.bench import Bench, BenchSession, load_bench
from mergelab.config import AdaptiveSpec, StudySpec, config_label
from mergelab.merging import METHODS
from mergelab.store import Kind, Store
from mergelab.taskset import TaskSet

#: The pseudo-task holding the joint-task metrics (Hits@k over the union of labels).
JOINT = "joint"
#: Metrics per task: test accuracy and its normalised value, the same on val, TAS on val.
TASK_METRICS = ("acc", "norm_acc", "val_acc", "val_norm_acc", "tas")
JOINT_KS = (1, 3, 5)


class NotCached(Exception):
    """A probing :class:`Context` met a node whose artifact is not in the store."""


@dataclass(frozen=True)
class NodeResult:
    """What one node did: its kind, its content key, whether the store already had it, and a label."""

    node: str
    key: str
    hit: bool
    label: str = ""


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



# The context a node runs in ------------------------------------------------------------------------


class Context:
    """A study's spec, store and lazily loaded benchmark, shared by the nodes of one process.

    ``bench`` overrides the benchmark the spec describes (``mergelab merge --select`` evaluates
    the user's adapters on a benchmark's tasks). A ``probe`` context computes nothing: a node
    whose artifact is missing raises :class:`NotCached` (see :func:`up_to_date`).
    """

    def __init__(self, spec: StudySpec, store_url: str, bench: Bench | None = None, probe: bool = False) -> None:
        self.spec = spec
        self.store = Store(store_url)
        self.probe = probe
        self._given_bench = bench
        self._lock = threading.RLock()
        self._local = threading.local()
        self._bases: dict[str, Bases | None] = {}
        self._bases_lock = threading.Lock()

    @cached_property
    def bench(self) -> Bench:
        with self._lock:
            return self._given_bench or load_bench(self.spec.bench, self.spec.tasks)

    @cached_property
    def session(self) -> BenchSession:
        """The bench's :class:`~mergelab.bench.BenchSession`, shared by this run's nodes."""
        with self._lock:
            return BenchSession(self.bench)

    @property
    def local_session(self) -> BenchSession:
        """The (warmed) session with this thread's own copy of the backbone.

        A functional forward swaps the module's parameters while it runs, so two threads must
        never run one module at once; each worker thread gets a private copy instead. Nodes whose
        artifact is already stored never ask for it, so a cached rerun skips the data entirely.
        """
        if getattr(self._local, "session", None) is None:
            with self._lock:
                self.session.warm()
                self._local.session = self.session.for_thread()
        return self._local.session

    @property
    def taskset(self) -> TaskSet:
        return self.session.taskset

    def space_bases(self, space: str) -> Bases | None:
        """The task set's bases for ``space`` (:func:`mergelab.bases.space_bases`), read from the
        store, or computed and published, once per run rather than once per merge."""
        with self._bases_lock:
            if space not in self._bases:
                self._bases[space] = space_bases(self.store, self.taskset, space)
            return self._bases[space]

    def cached(self, key: str) -> bool:
        """Whether ``key`` is published (a probe raises :class:`NotCached` instead of answering no)."""
        if self.store.exists(key):
            return True
        if self.probe:
            raise NotCached(key)
        return False

    def publish(self, key: str, kind: Kind, compute: Callable[[], Any], attrs: Mapping[str, Any] | None = None) -> bool:
        """Publish ``compute()`` under ``key`` unless it is there (nothing is read then); return the hit."""
        if self.cached(key):
            return True
        self.store.memo(key, kind, compute, attrs)
        return False


_CONTEXTS: dict[tuple[str, str, str], Context] = {}
_CONTEXTS_LOCK = threading.Lock()
#: Contexts kept per process (older runs' are dropped: a run re-reads its checkpoints).
_KEEP = 2


def context(spec: StudySpec, store_url: str, run: str = "") -> Context:
    """The :class:`Context` of one run (``run`` identifies it) of ``spec`` against ``store_url``.

    Nodes of the same run in the same process share it; a new run loads the checkpoints again,
    so adapters changed on disk between scheduled runs are seen.
    """
    ident = (spec.model_dump_json(), store_url, run)
    with _CONTEXTS_LOCK:
        if ident not in _CONTEXTS:
            _CONTEXTS[ident] = Context(spec, store_url)
            while len(_CONTEXTS) > _KEEP:
                _CONTEXTS.pop(next(iter(_CONTEXTS)))
        return _CONTEXTS[ident]



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
