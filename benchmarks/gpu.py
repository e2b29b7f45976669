"""On a GPU: ViT-B/32-shape adaptation per iteration and evaluation throughput (issue 16), the whole
LLaMA-3-8B-shape Core merge, and a micro-benchmark study with ``device: cuda`` end to end (issue 31 item 5).

Prepared to run in one short call on a machine with a GPU (nothing in CI depends on it), in three
sections (``--sections``); a section that fails prints its error in one line and the next one runs.

**adapt** (and evaluation): an open_clip ViT-B-32 image tower with random weights (no download) placed on ``--device`` under
``--dtype`` autocast (:mod:`mergelab.model.placement`, what a study's ``device`` / ``dtype`` do),
T = 8 synthetic rank-16 LoRA tasks on its q, k, v, out projections, random unit-norm heads of
10 classes and random 224-pixel batches. It times ``mergelab.adaptation.adapt`` per iteration
for AdaMerging, TARA-A, TARA-B and AdaRank (after a warm-up run), and the images per second of
evaluating a merged model. 001 reports 4.1 / 4.1 / 5.1 min for AdaMerging / TARA-A / TARA-B
(500 iterations, ViT-B/32, one GPU); the script prints its per-iteration times scaled to
``--paper-iters`` beside them.

**merge**: seeded rank-16 LoRA factors of every q, k, v, o, gate, up, down projection of a LLaMA-3-8B
(32 layers, T = 6: 003 Tab. 2's setting) placed on ``--device``, and ``merge(taskset, method, "core")``
for task arithmetic, TIES and TSV timed there after a warm-up merge (003 Tab. 2 reports Core's merge
time on a GPU); a study merges on the CPU in float64, so this section measures what the Core route's
small Gram eigendecompositions and products cost on the device.

**study**: a study on the shipped micro benchmark (task arithmetic in full space, TIES in Core space,
AdaMerging and TARA-B, the references, every evaluation, one analysis) with ``device: --device`` and
``dtype: --dtype``, run by ``mergelab run`` in a fresh process into a fresh store: its wall time and summary.

Times of one run, on one machine; not a test.

    PYTHONPATH=lib:flows:analysis:app python benchmarks/gpu.py --device cuda --dtype bfloat16
    PYTHONPATH=lib:flows:analysis:app python benchmarks/gpu.py --device cpu --dtype float32 --quick   # smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from mergelab.adaptation import Schedule, adapt
from mergelab.adaptation.loop import Forward
from mergelab.evaluation.heads import image_logits
from mergelab.evaluation.metrics import image_features
from mergelab.merging import merge
from mergelab.model import BACKENDS
from mergelab.model.placement import placed
from mergelab.synthetic import random_taskset
from mergelab.taskset import LowRank, TaskSet, TaskUpdate, add_updates

from scale import models

ROOT = Path(__file__).resolve().parents[1]

METHODS = {"adamerging": {}, "tara_a": {}, "tara_b": {"space": "core"}, "adarank": {"origin": "ta", "space": "core"}}
PAPER_MINUTES = {"adamerging": 4.1, "tara_a": 4.1, "tara_b": 5.1}


def streams(tasks: int, batch: int, size: int, seed: int):
    """One endless stream of random image batches per task (the images' content does not change the cost)."""
    def stream(t: int):
        g = torch.Generator().manual_seed(seed + t)
        while True:
            yield torch.randn(batch, 3, size, size, generator=g)
    return [stream(t) for t in range(tasks)]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def adaptation(args: argparse.Namespace) -> None:
    """Section adapt: ViT-B/32-shape adaptation per iteration and the evaluation throughput."""
    size = 64 if args.quick else 224
    tasks, iters = (2, 2) if args.quick else (args.tasks, args.iters)
    backbone = placed(BACKENDS["open_clip"]("ViT-B-32", seed=0, force_image_size=size), args.device, args.dtype)
    base = backbone.base_state()
    targets = {f"{m}.weight": tuple(base[f"{m}.weight"].shape) for m in backbone.lora_targets()}
    taskset = random_taskset(targets, tasks, rank=16, seed=0)
    g = torch.Generator().manual_seed(1)
    heads = [F.normalize(torch.randn(10, backbone.vision.output_dim, generator=g), dim=-1) * 100.0 for _ in range(tasks)]
    forward = Forward(base={m: base[m] for m in taskset.module_names},
                      logits=lambda t, x, p: image_logits(backbone, x, heads[t], p), tokens=backbone.image_tokens)
    print(f"ViT-B-32 image tower ({len(targets)} LoRA targets, T = {tasks}, r = 16, batch {args.batch}/task, {size} px), {args.dtype}")
    for method, hp in METHODS.items():
        adapt(method, taskset, forward, streams(tasks, args.batch, size, 0), Schedule(iters=1), **hp)  # warm-up: kernels, banks
        result = adapt(method, taskset, forward, streams(tasks, args.batch, size, 1), Schedule(iters=iters), **hp)
        minutes = result.seconds_per_iter * args.paper_iters / 60
        paper = f"; 001: {PAPER_MINUTES[method]} min" if method in PAPER_MINUTES else ""
        print(f"  {method:12s} {1000 * result.seconds_per_iter:9.1f} ms / iteration  -> {minutes:6.2f} min for {args.paper_iters}{paper}")
    params = add_updates(base, merge(taskset, "task_arithmetic", alpha=0.3).modules)
    images = torch.randn(min(args.eval_images, 64) if args.quick else args.eval_images, 3, size, size)
    image_features(backbone, images[:256], params)  # warm-up
    start = time.perf_counter()
    image_features(backbone, images, params, batch_size=256)
    synchronize(args.device)
    print(f"  evaluation   {len(images) / (time.perf_counter() - start):9.0f} images / s (merged model, batches of 256)")


def on_device(taskset: TaskSet, device: str) -> TaskSet:
    """``taskset`` with every factor on ``device``."""
    return TaskSet(tuple(TaskUpdate(t.name, {m: LowRank(u.B.to(device), u.A.to(device)) for m, u in t.modules.items()},
                                    source=t.source, meta=t.meta) for t in taskset.tasks), taskset.base)


def core_merges(args: argparse.Namespace) -> None:
    """Section merge: the whole LLaMA-3-8B-shape Core merge (TA, TIES, TSV) with the factors on the device."""
    model = next(m for m in models(args.quick) if m.key == "llama3-8b")  # scale.py's shapes (quick: 2 layers, hidden 256)
    taskset = on_device(random_taskset(model.shapes(), model.tasks, rank=model.rank, seed=0), args.device)
    print(f"{model.title}, {model.layers} layers × {len(model.block)} modules, T = {model.tasks}, r = {model.rank}, "
          f"factors on {args.device}")
    merge(taskset, "task_arithmetic", "core")  # warm-up: kernels, allocator
    for method in ("task_arithmetic", "ties", "tsv"):
        synchronize(args.device)
        start = time.perf_counter()
        merged = merge(taskset, method, "core")
        synchronize(args.device)
        seconds = time.perf_counter() - start
        where = next(iter(merged.modules.values())).B.device
        print(f"  core {method:16s} {seconds:8.2f} s for the whole model ({1000 * seconds / len(merged.modules):6.1f} ms / module; "
              f"result on {where})")


def micro_study(args: argparse.Namespace) -> None:
    """Section study: a micro-benchmark study with ``device`` / ``dtype`` set, through ``mergelab run``."""
    iters = 2 if args.quick else 50
    study = {"name": "gpu-micro", "bench": {"kind": "micro", "root": str(ROOT / "data" / "micro")}, "device": args.device,
             "dtype": args.dtype, "seeds": [0], "analyses": ["norms"],
             "methods": [{"method": "task_arithmetic", "spaces": ["full"], "grid": {"alpha": [0.3]}},
                         {"method": "ties", "spaces": ["core"], "grid": {"density": [0.5], "alpha": [1.0]}}],
             "adaptive": [{"method": "adamerging", "iters": iters}, {"method": "tara_b", "iters": iters}]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / wing) for wing in ("lib", "flows", "analysis", "app"))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text(yaml.safe_dump(study))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mergelab_app", "run", str(path), "--store", str(Path(tmp) / "store")],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - start
    summary = [line for line in proc.stdout.splitlines() if line.startswith("study ")]
    if proc.returncode != 0:
        raise RuntimeError(f"mergelab run exited {proc.returncode}: {(proc.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    print(f"micro study on {args.device}, {args.dtype} ({iters}-step adaptive runs), cold, one process: {seconds:.1f} s wall")
    print(f"  {summary[0] if summary else '(no summary line)'}")


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {"adapt": adaptation, "merge": core_merges, "study": micro_study}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (autocast)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="images per task per iteration (AdaMerging's 16)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per method")
    parser.add_argument("--paper-iters", type=int, default=500)
    parser.add_argument("--eval-images", type=int, default=2048)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 tasks, 2 iterations: a smoke run")
    args = parser.parse_args(argv)
    chosen = args.sections.split(",")
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{args.device} ({card}), torch {torch.__version__}")
    for name in chosen:
        try:
            SECTIONS[name](args)
        except (RuntimeError, ValueError, OSError) as err:  # one section's failure on a new device does not cost the others
            print(f"section {name} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


if __name__ == "__main__":
    main()
