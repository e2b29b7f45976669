"""ViT-B/32-shape adaptation per iteration and evaluation throughput on a GPU (issue 16).

Prepared to run in one short call on a machine with a GPU (nothing in CI depends on it):
an open_clip ViT-B-32 image tower with random weights (no download) placed on ``--device`` under
``--dtype`` autocast (:mod:`mergelab.model.placement`, what a study's ``device`` / ``dtype`` do),
T = 8 synthetic rank-16 LoRA tasks on its q, k, v, out projections, random unit-norm heads of
10 classes and random 224-pixel batches. It times ``mergelab.adaptation.adapt`` per iteration
for AdaMerging, TARA-A, TARA-B and AdaRank (after a warm-up run), and the images per second of
evaluating a merged model. 001 reports 4.1 / 4.1 / 5.1 min for AdaMerging / TARA-A / TARA-B
(500 iterations, ViT-B/32, one GPU); the script prints its per-iteration times scaled to
``--paper-iters`` beside them. Times of one run, on one machine; not a test.

    PYTHONPATH=lib python benchmarks/gpu.py --device cuda --dtype bfloat16
    PYTHONPATH=lib python benchmarks/gpu.py --device cpu --quick      # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mergelab.adaptation import Schedule, adapt
from mergelab.adaptation.loop import Forward
from mergelab.evaluation.heads import image_logits
from mergelab.evaluation.metrics import image_features
from mergelab.merging import merge
from mergelab.model import BACKENDS
from mergelab.model.placement import placed
from mergelab.synthetic import random_taskset
from mergelab.taskset import add_updates

METHODS = {"adamerging": {}, "tara_a": {}, "tara_b": {"space": "core"}, "adarank": {"origin": "ta", "space": "core"}}
PAPER_MINUTES = {"adamerging": 4.1, "tara_a": 4.1, "tara_b": 5.1}


def streams(tasks: int, batch: int, size: int, seed: int):
    """One endless stream of random image batches per task (the images' content does not change the cost)."""
    def stream(t: int):
        g = torch.Generator().manual_seed(seed + t)
        while True:
            yield torch.randn(batch, 3, size, size, generator=g)
    return [stream(t) for t in range(tasks)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (autocast)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="images per task per iteration (AdaMerging's 16)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per method")
    parser.add_argument("--paper-iters", type=int, default=500)
    parser.add_argument("--eval-images", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="64-pixel images, 2 tasks, 2 iterations: a smoke run")
    args = parser.parse_args(argv)
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
    print(f"ViT-B-32 image tower ({len(targets)} LoRA targets, T = {tasks}, r = 16, batch {args.batch}/task, {size} px) "
          f"on {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), {args.dtype}, "
          f"torch {torch.__version__}")
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
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"  evaluation   {len(images) / (time.perf_counter() - start):9.0f} images / s (merged model, batches of 256)")


if __name__ == "__main__":
    main()
