"""Shared fixtures: tiny real PEFT adapters on an open_clip ViT and an HF CLIP vision model."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# `make test` runs the suite on pytest-xdist workers: each worker (and every process it starts) gets its
# share of the cores, so the workers' torch thread pools do not oversubscribe the machine.
# xdist's workers also start with COLUMNS=80 and LINES=24, which the command line's rich consoles would
# keep as a fixed width from their import on; without them a worker prints as a serial run does.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)

import pytest
import torch
from hypothesis import settings

# Property tests run the same examples on every machine (CI must not flake on a new random draw);
# `HYPOTHESIS_PROFILE=explore pytest` searches fresh examples locally.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _no_user_store(tmp_path_factory):
    """Tests never touch the user's store: the checkout's data/store (the default of commands run in
    the checkout, in this process) gives way to the cache default, which points into the test's temp
    dir, and a developer's $MERGELAB_STORE (which beats a study's store:) and $MERGELAB_STUDY (the
    notebooks' default study, which `make lab` sets) are ignored."""
    import mergelab.store

    saved = {k: os.environ.pop(k, None) for k in ("MERGELAB_STORE", "MERGELAB_STUDY", "XDG_CACHE_HOME")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mergelab.store, "checkout_store", lambda: None)
        yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_vit():
    from mergelab.synthetic import tiny_vision_transformer

    return tiny_vision_transformer(seed=0)


@pytest.fixture(scope="session")
def vit_adapters(tiny_vit, tmp_path_factory) -> list[Path]:
    """Three PEFT LoRA adapters (r=4, alpha=8) on the tiny open_clip ViT's attention."""
    from mergelab.synthetic import write_peft_adapters

    out = tmp_path_factory.mktemp("vit_adapters")
    return write_peft_adapters(copy.deepcopy(tiny_vit), out, ["digits", "textures", "signs"], target_modules=["attn"], rank=4, alpha=8)


@pytest.fixture(scope="session")
def hf_clip_vision():
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=4)
    return transformers.CLIPVisionModel(config)


@pytest.fixture
def store(tmp_path):
    from mergelab.store import Store

    return Store(tmp_path / "store")


@pytest.fixture(scope="session")
def micro_pair():
    """A session on the shipped micro benchmark, rank-4 adapters of two tasks (model-dependent analyses)."""
    from mergelab.bench import MicroSpec, load_bench
    from mergelab.bench import BenchSession

    return BenchSession(load_bench(MicroSpec(root=REPO / "data" / "micro", rank=4), ["digits", "textures"]))


@pytest.fixture(scope="session")
def micro():
    """The shipped micro benchmark (data/micro): backbone, eight tasks, rank-4 and rank-16 adapters."""
    from mergelab.micro.benchmark import load_micro

    return load_micro(REPO / "data" / "micro")


@pytest.fixture(scope="session")
def bench_datasets(micro_pair):
    """Every model-dependent analysis (``anisotropy``, ``components``, ``tas_sweep``,
    ``embedding_interference``, ``truncation_accuracy``, ``reference_basis_accuracy``) on
    ``micro_pair`` with the tiny budgets of ``helpers.BENCH_PARAMS``,
    computed once per session with one torch thread (restored after). Unlabelled: label a copy."""
    from helpers import bench_analyses

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench_analyses(micro_pair)
    finally:
        torch.set_num_threads(threads)


ADAPT_TASKS = ("signs", "housenumbers", "digits")


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test (restored after): on the shared 2-core machines
    other jobs keep both cores busy and OpenMP's second thread then spins instead of working."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def adaptation_studies(micro):
    """Every adaptation study Dataset on three rank-4 micro tasks, tiny schedules (1-4 iterations, batch 4), and the
    histories of the adaptive runs notebook 60 draws (AdaRank from both origins, AdaMerging with the TAS loss).

    Built with one torch thread (restored after): the shared 2-core machines run other jobs, and
    OpenMP's second thread then spins instead of working.
    """
    from mergelab.bench import MicroSpec, load_bench
    from mergelab.bench import BenchSession
    from mergelab.adaptation import Schedule
    from mergelab.experiments.adaptation_studies import AdaptationSetting, adarank_ablation
    from mergelab.experiments.preferences import pareto_sweep, sensitivity_cloud, stch_alpha_ablation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        session = BenchSession(load_bench(MicroSpec(root=micro.root, rank=4), ADAPT_TASKS))
        setting = AdaptationSetting(session, schedule=Schedule(iters=2, batch_size=4))
        label = "micro benchmark (rank-4 adapters, test schedule)"
        studies = {
            "preferences/pareto": pareto_sweep(setting, pair=ADAPT_TASKS[:2], n_preferences=3, dataset=label),
            "preferences/cloud": sensitivity_cloud(setting, ADAPT_TASKS[:2], n_preferences=3, splits=("test",), dataset=label),
            "preferences/stch_alpha": stch_alpha_ablation(setting, alphas=(0.5, 2.0), splits=("test",), dataset=label),
            "ablations/adarank": adarank_ablation(setting, splits=("test",), dataset=label),
        }
        fast = AdaptationSetting(session, schedule=Schedule(iters=4, batch_size=4, lr=0.05))
        runs = {"adapt/adarank": fast.adapt("adarank"),  # the TA origin: every singular component
                "adapt/adarank_cart": fast.adapt("adarank", origin="cart", rank_ratio=0.05),  # k = 4 of the 12 centred components
                "adapt/adamerging_tas": fast.adapt("adamerging_tas")}
        for name, run in runs.items():
            studies[name] = run.history.assign_attrs(dataset=label)
    finally:
        torch.set_num_threads(threads)
    return studies
