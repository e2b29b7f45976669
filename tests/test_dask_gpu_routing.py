"""Model-running nodes on an existing Dask cluster ask for a ``GPU`` worker when the study's device is
a GPU (issue 33 item 6): the decision for every runner and device, and a micro study on a local
cluster whose one worker declares the resource, where exactly the model-running nodes ask for it
and run there."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from distributed import Scheduler, SpecCluster, Worker
from distributed.diagnostics.plugin import SchedulerPlugin

pytestmark = pytest.mark.flow

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny_gpu_routing",
    "bench": {"kind": "micro", "root": str(REPO / "data/micro"), "rank": 4},
    "tasks": ["digits", "textures"],
    "methods": [{"method": "task_arithmetic", "spaces": ["full"], "grid": {"alpha": [0.5]}}],
}


def test_only_a_gpu_study_on_an_existing_scheduler_asks_for_a_gpu():
    from prefect_dask import DaskTaskRunner

    from mergelab_flows.runtime import gpu_resources, task_runner

    existing = DaskTaskRunner(address="tcp://127.0.0.1:8786")  # made, not connected
    assert gpu_resources(existing, "cuda") == {"GPU": 1}
    assert gpu_resources(existing, "cuda:1") == {"GPU": 1}
    assert gpu_resources(existing, "cpu") == {}
    assert gpu_resources(task_runner("dask"), "cuda") == {}  # a local cluster declares no resources
    assert gpu_resources(task_runner("thread"), "cuda") == {}


class Placements(SchedulerPlugin):
    """A scheduler plugin that records, for every finished task, the resources it asked for and the
    resources of the worker that ran it."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.done: list[tuple[dict, dict]] = []

    def transition(self, key, start, finish, *args, stimulus_id: str, **kwargs) -> None:
        if finish == "memory" and "worker" in kwargs:
            asked = dict(self.scheduler.tasks[key].resource_restrictions or {})
            self.done.append((asked, dict(self.scheduler.workers[kwargs["worker"]].resources)))


@pytest.fixture
def cluster():
    """A scheduler with two in-process workers, one declaring ``GPU=1``."""
    workers = {"cpu": {"cls": Worker, "options": {"nthreads": 1}},
               "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as running:
        yield running


def test_model_nodes_of_a_gpu_study_run_on_the_gpu_worker(cluster, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness
    from prefect_dask import DaskTaskRunner

    import mergelab_flows.runtime
    from mergelab_flows.study import GPU_NODES, study_flow

    placements = Placements(cluster.scheduler)
    cluster.scheduler.add_plugin(placements, name="placements")
    # this machine has no GPU: a CPU study stands for one, so the real decision sees a GPU device
    monkeypatch.setattr(mergelab_flows.runtime, "GPU_DEVICE_TYPES", ("cpu",))
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY))
    with prefect_test_harness(server_startup_timeout=90):
        run = study_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(
            str(study), store=str(tmp_path / "store"))

    model_nodes = sum(r.node in GPU_NODES for r in run.nodes)
    assert 0 < model_nodes < len(run.nodes)
    asked_gpu = [worker for asked, worker in placements.done if asked == {"GPU": 1}]
    assert len(asked_gpu) == model_nodes and all(worker == {"GPU": 1} for worker in asked_gpu), placements.done
