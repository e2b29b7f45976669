"""The conformance checks of a bench kind (:data:`mergelab.bench.BENCHES`) and its example bench."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mergelab.conformance.base import Check, ConformanceError, require

__all__ = ["checks_for_bench", "example_bench"]


# Bench kinds -----------------------------------------------------------------------------------------


@functools.cache
def example_bench(kind: str):
    """The :class:`~mergelab.bench.Bench` of bench kind ``kind``'s declared example (``BenchKind.example``),
    loaded once per process; its files live in a temporary folder for as long."""
    from mergelab.bench import BENCHES, load_bench

    example = BENCHES[kind].example
    require(example is not None, f"bench kind {kind!r} declares no example")
    _FOLDERS.append(tempfile.TemporaryDirectory(prefix=f"mergelab-{kind}-"))  # removed at exit
    return load_bench(*example(Path(_FOLDERS[-1].name)))


_FOLDERS: list[tempfile.TemporaryDirectory] = []


def checks_for_bench(name: str) -> Iterator[Check]:
    """The checks of bench kind ``name``: its settings schema, and its example where it declares one."""
    from mergelab.bench import BENCHES, bench_spec
    from mergelab.errors import InputError

    kind = BENCHES[name]

    def settings() -> None:
        require(bench_spec({"kind": name}) == kind.spec(), "the default settings do not validate to the spec's defaults")
        foreign = [f for other in BENCHES.values() for f in other.spec.model_fields if f not in kind.spec.model_fields]
        for key in ["no_such_setting", *foreign[:1]]:
            try:
                bench_spec({"kind": name, key: 1})
            except (InputError, ValueError) as err:
                require(key in str(err), f"refusing the unknown setting {key!r} does not name it: {err}")
            else:
                raise ConformanceError(f"the unknown setting {key!r} is accepted")

    def loads() -> None:
        from mergelab.bench import Bench

        bench = example_bench(name)
        require(isinstance(bench, Bench) and bool(bench.tasks), f"the example loads {type(bench).__name__} with tasks {list(bench.tasks)}")
        require(list(bench.taskset.names) == list(bench.tasks), f"adapters of {list(bench.taskset.names)} for tasks {list(bench.tasks)}")
        require(bench.taskset.layout is kind.layout, "the loaded task set does not carry the kind's layout")
        base = bench.backbone.base_state()
        for m in bench.taskset.module_names:
            require(m in base, f"the adapters update {m!r}, which the backbone's base state lacks")
            require((shape := tuple(bench.taskset.tasks[0].modules[m].shape)) == tuple(base[m].shape),
                     f"module {m!r}: update {shape}, base weight {tuple(base[m].shape)}")
        targets = [f"{t}.weight" for t in bench.backbone.lora_targets()]
        require(bool(targets), "the backbone names no LoRA targets")
        for t in targets:
            require(kind.layout.role(t) != "other" and kind.layout.layer(t) >= 0, f"the layout knows no block or role of {t!r}")
        roles = {kind.layout.role(n) for n, w in base.items() if len(w.shape) == 2}
        require({"attention", "mlp"} <= roles, f"the layout finds the roles {sorted(roles)} in the backbone, not attention and mlp")

    yield Check("bench", name, "settings_validate_and_refuse_unknown_keys", settings)
    if kind.example is not None:
        yield Check("bench", name, "example_loads_adapters_that_fit_the_backbone", loads)
