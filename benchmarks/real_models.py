"""The real-model path at real shapes, run as a user runs it (issue 16).

Three benches, each on random weights of a real architecture written to disk as a user has it,
random rank-r PEFT adapters and small generated data (``mergelab.synthetic``):

* ``open_clip``: a whole ViT-B-32 checkpoint (``torch.save`` of the CLIP state dict, image and text
  towers) and adapters trained on its image tower, on the stock packed attention (``attn``) and the
  MLP (``c_fc``, ``c_proj``); ImageFolder data at 224 px;
* ``hf_clip``: a ``CLIPModel`` directory of openai/clip-vit-base-patch32's configuration and
  adapters on its ``CLIPVisionModel`` ``q_proj / k_proj / v_proj / out_proj`` (the KnOTS
  checkpoints' layout); the same image data;
* ``hf_seq_cls``: a ``LlamaForSequenceClassification`` directory of a LLaMA configuration
  (``--llm``: Llama-3.2-1B by default, which fits this machine; ``llama3-8b`` is 003 Tab. 2's model) and
  ``SEQ_CLS`` adapters on q, k, v, o, gate, up, down that keep their own ``score`` heads; text rows as CSV.

For each bench, as separate processes of the CLI (what a user types): ``mergelab check`` (the
preflight), ``mergelab merge --base <the whole checkpoint> --method ties --space core`` and
``mergelab run`` of a study YAML (TA in the full and Core spaces, TIES in the KnOTS and Core
spaces, every merge evaluated on val and test, references, TAS), then the same study again (every
node a cache hit). *peak* is each process's maximum resident set (``VmHWM``, sampled every 0.2 s), and
*× model* that peak over the model's size (its checkpoint on disk, float32 as the study holds it): a
study holds the model once, and beside it the process's own memory, one layer's merged weights per
running evaluation and a merge's working set, never a copy of the adapted matrices (issue 31 item 4).
The scores are those of random models on random data: they show that every cell is computed, nothing more.

Methodology (``benchmarks/timing.py``): each step is timed in CPU time (the child process's user +
system time) and wall time, and printed with the load average; the models are float32 and every
merge computes in float64 (``PRECISION``). The steps are not interleaved over rounds: each one needs
the one before it (the rerun needs the cold run's store), and nothing here compares two routes.

    PYTHONPATH=lib python benchmarks/real_models.py              # the table in benchmarks/README.md
    PYTHONPATH=lib python benchmarks/real_models.py --quick      # tiny configs of the same architectures (~2 min)
    # options: --benches open_clip,hf_clip,hf_seq_cls  --llm llama3.2-1b|llama3-8b  --tasks N  --rank N  --runner thread=1  --workdir DIR

A benchmark, not a test: nothing here asserts a time (tests/test_real_model_studies.py runs the
same benches on tiny configs in the suite).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mergelab.synthetic import (clip_directory, image_folders, llama_classifier, open_clip_checkpoint, text_folders,
                                write_peft_adapters)

from checkout import pythonpath
from timing import Times, load, machine, now, timed

CLASSES = ("red", "green", "blue")
WORDS = ("a", "photo", "picture", "of", *CLASSES, "good", "bad", "fine", "awful", "yes", "no", "maybe", "cat", "dog", "sun", "rain")
#: the study every bench runs: task arithmetic in full and Core space, TIES in KnOTS and Core space
METHODS = [{"method": "task_arithmetic", "spaces": ["full", "core"], "grid": {"alpha": [0.3]}},
           {"method": "ties", "spaces": ["knots", "core"], "grid": {"density": [0.2], "alpha": [1.0]}}]

#: ``LlamaConfig`` fields of the language models (vocabulary as the real ones: it sizes the embedding)
LLMS = {
    "llama3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 128256},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": len(WORDS) + 2},
}
#: openai/clip-vit-base-patch32's configuration, and a tiny one of the same architecture for --quick
HF_CLIP = {
    "vit-b32": {"vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                           "image_size": 224, "patch_size": 32},
                "text": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                         "num_attention_heads": 8, "max_position_embeddings": 77, "eos_token_id": 2},
                "projection_dim": 512},
    "tiny": {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "image_size": 32, "patch_size": 8},
             "text": {"vocab_size": len(WORDS) + 2, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 2},
             "projection_dim": 16},
}


@dataclass(frozen=True)
class Built:
    """What a bench's setup wrote: the study's bench entry, the base path for ``--base``, the
    adapters and data per task, and a line describing the shapes."""

    bench: dict
    base: Path
    adapters: dict[str, Path]
    data: dict[str, str]
    shape: str


def _tasks(n: int) -> list[str]:
    return [f"task{i}" for i in range(n)]


def build_open_clip(work: Path, args) -> Built:
    arch = "ViT-S-32-alt" if args.quick else "ViT-B-32"  # the smallest stock open_clip ViT for --quick
    model = open_clip_checkpoint(work / "open_clip.pt", arch)
    tasks = _tasks(args.tasks)
    paths = write_peft_adapters(copy.deepcopy(model.visual), work / "adapters", tasks, target_modules=["attn", "c_fc", "c_proj"],
                                rank=args.rank, alpha=args.rank)
    size = model.visual.image_size[0]
    data = image_folders(work / "data", tasks, CLASSES, size=size, per_class=args.images)
    bench = {"kind": "open_clip", "arch": arch, "weights": str(work / "open_clip.pt")}
    blocks, width = len(model.visual.transformer.resblocks), model.visual.transformer.width
    return Built(bench, work / "open_clip.pt", dict(zip(tasks, paths, strict=True)), data,
                 f"{arch} ({blocks} blocks, width {width}, {size} px); adapters on attn (packed q/k/v + out), c_fc, c_proj")


def build_hf_clip(work: Path, args) -> Built:
    import transformers

    config = HF_CLIP["tiny" if args.quick else "vit-b32"]
    clip = clip_directory(work / "clip", words=WORDS, **config)
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())
    tasks = _tasks(args.tasks)
    paths = write_peft_adapters(vision, work / "adapters", tasks, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                rank=args.rank, alpha=args.rank)
    v = config["vision"]
    data = image_folders(work / "data", tasks, CLASSES, size=v["image_size"], per_class=args.images)
    return Built({"kind": "hf_clip", "weights": str(work / "clip")}, work / "clip", dict(zip(tasks, paths, strict=True)), data,
                 f"CLIPModel, vision {v['num_hidden_layers']} layers × {v['hidden_size']} ({v['image_size']} px); "
                 "adapters on q_proj, k_proj, v_proj, out_proj")


def build_hf_seq_cls(work: Path, args) -> Built:
    name = "tiny" if args.quick else args.llm
    config = LLMS[name]
    model = llama_classifier(work / "llama", words=WORDS, num_labels=2, max_position_embeddings=2048, **config)
    tasks = _tasks(args.tasks)
    paths = write_peft_adapters(model, work / "adapters", tasks, rank=args.rank, alpha=args.rank, task_type="SEQ_CLS",
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    del model
    data = text_folders(work / "data", dict.fromkeys(tasks), WORDS, rows=args.rows, length=12)
    return Built({"kind": "hf_seq_cls", "weights": str(work / "llama"), "max_length": 16}, work / "llama",
                 dict(zip(tasks, paths, strict=True)), data,
                 f"LlamaForSequenceClassification {name} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
                 f"MLP {config['intermediate_size']}); adapters on q, k, v, o, gate, up, down + a score head each")


BENCHES: dict[str, Callable[[Path, argparse.Namespace], Built]] = {
    "open_clip": build_open_clip, "hf_clip": build_hf_clip, "hf_seq_cls": build_hf_seq_cls}


#: the precision of every route: weights on disk and in the study, and the merges' arithmetic
PRECISION = "float32 weights, merges in float64 (float32 results)"


@dataclass(frozen=True)
class Step:
    """One CLI process: its CPU and wall time, peak resident set and summary line."""

    times: Times
    peak_mib: float
    last: str


def _peak_mib(pid: int) -> float | None:
    """The process's resident-set high-water mark (``VmHWM``; its own, reset at exec), or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)


def _cli(args: list[str], log: Path, env: dict[str, str]) -> Step:
    """``mergelab ARGS`` as its own process; its wall time, peak resident set (sampled every 0.2 s)
    and summary line. A failing command stops the benchmark with its log's tail."""
    start, peak = now(), 0.0
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mergelab_app.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, _peak_mib(proc.pid) or 0.0)
            time.sleep(0.2)
    times = now() - start  # the child is reaped by poll(): its CPU time is in now()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    if proc.returncode != 0:
        sys.exit(f"mergelab {args[0]} failed (exit {proc.returncode}); the end of {log}:\n" + "\n".join(lines[-15:]))
    summary = next((line for line in lines if line.startswith("study ")), lines[-1] if lines else "")  # a study's one-line summary
    return Step(times, peak, summary)


def _size_gib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**30


def run_bench(name: str, work: Path, args, env: dict[str, str]) -> list[tuple[str, Step]]:
    built, setup = timed(lambda: BENCHES[name](work, args))
    print(f"\n{name}: {built.shape}; T = {len(built.adapters)}, r = {args.rank}; base on disk {_size_gib(built.base):.2f} GiB, "
          f"written in {setup.cpu:.0f} s CPU / {setup.wall:.0f} s wall; {PRECISION}", flush=True)
    study = work / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": f"bench-{name}", "bench": built.bench, "methods": METHODS, "seeds": [0],
        "tasks": [{"name": t, "adapter": str(built.adapters[t]), "data": built.data[t]} for t in built.adapters]}))
    named = [f"{t}={p}" for t, p in built.adapters.items()]
    store = ["--store", str(work / "store")]
    runner = ["--runner", args.runner] if args.runner else []
    steps = [
        ("check (preflight)", _cli(["check", "--base", str(built.base), *named], work / "check.log", env)),
        ("merge (ties, core) from the whole checkpoint",
         _cli(["merge", "--base", str(built.base), "--adapters", *named, "--method", "ties", "--space", "core",
               "--out", str(work / "merged"), *store], work / "merge.log", env)),
        ("run (study, cold)", _cli(["run", str(study), *store, *runner], work / "run.log", env)),
        ("run (study, rerun)", _cli(["run", str(study), *store, *runner], work / "rerun.log", env)),
    ]
    model_mib = _size_gib(built.base) * 1024
    for label, step in steps:
        print(f"  {label:<46} CPU {step.times.cpu:8.1f} s  wall {step.times.wall:8.1f} s   peak {step.peak_mib:8.0f} MiB "
              f"= {step.peak_mib / model_mib:4.2f}× model   {step.last}", flush=True)
    print(f"  {load()}", flush=True)
    table = (work / "run.log").read_text().splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("study "))
    print("  " + "\n  ".join(table[start + 1:]), flush=True)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benches", default=",".join(BENCHES), help="comma-separated: " + ", ".join(BENCHES))
    parser.add_argument("--llm", default="llama3.2-1b", choices=[k for k in LLMS if k != "tiny"])
    parser.add_argument("--tasks", type=int, default=3, help="adapters per bench (T)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--images", type=int, default=4, help="images per class and split (3 classes)")
    parser.add_argument("--rows", type=int, default=16, help="text rows per split")
    parser.add_argument("--runner", default=None, help="mergelab run's --runner (default: its own, thread)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the written models, adapters, data and store here")
    parser.add_argument("--quick", action="store_true", help="tiny configs of the same architectures")
    args = parser.parse_args()
    unknown = sorted(set(args.benches.split(",")) - set(BENCHES))
    if unknown:
        parser.error(f"unknown bench(es) {unknown}; choose from {sorted(BENCHES)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PYTHONPATH"] = pythonpath(env=env)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mergelab-real-"))
    print(f"the real-model path at {'tiny' if args.quick else 'real'} shapes (torch {torch.__version__}, {machine()}, "
          f"{load()}); work in {root}", flush=True)
    for name in args.benches.split(","):
        work = root / name
        if work.exists():
            sys.exit(f"{work} exists; pass another --workdir")
        work.mkdir(parents=True)
        run_bench(name, work, args, env)


if __name__ == "__main__":
    main()
