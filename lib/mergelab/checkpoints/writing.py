"""Checkpoints out: merged weights (sharded above a size) or a PEFT adapter with its model card,
written atomically; rank capping (see :mod:`mergelab.checkpoints`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from mergelab.cards import CARD, model_card
from mergelab.errors import InputError, safetensors_os_errors
from mergelab.linalg import lowrank_svd, svd64
from mergelab.outputs import check_replaceable, claimed, follow_umask, remove_leftovers, temporary_sibling
from mergelab.provenance import merge_reproducibility
from mergelab.strict import SAFE_NAME
from mergelab.taskset import LowRank, MergedUpdate, Update

from mergelab.checkpoints.files import ADAPTER_CONFIG, PEFT_PREFIX, BaseLike, StateDict, load_state_dict

__all__ = ["DEFAULT_SHARD_SIZE", "cap_rank", "merged_rank", "parse_size", "save_merged"]

#: ``--shard-size`` by default: Hugging Face's ``max_shard_size`` (``save_pretrained``).
DEFAULT_SHARD_SIZE = 5 * 10**9
#: Byte multipliers of :func:`parse_size`'s units (KB, MB, GB, TB: powers of 10, as Hugging Face counts; KiB…: of 2).
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: Files of a Hugging Face model directory that ``--format weights`` copies from a base directory, so that
#: ``from_pretrained`` loads the output as it loads the base.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# Writing -----------------------------------------------------------------------------------


def _publish_dir(out: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Write a directory under a temporary name next to ``out``, then rename it into place. An
    existing ``out`` is replaced only with ``overwrite`` and only when it is a previous output
    (:func:`~mergelab.outputs.check_replaceable`); leftovers of killed writes to ``out`` go first."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"output {out} already exists; choose another path or pass overwrite=True (CLI: --force)")
        check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out.parent, out.name)
    tmp = temporary_sibling(out)
    try:
        with claimed(tmp), safetensors_os_errors(out):
            write(tmp)
            follow_umask(tmp)
            if out.exists() or out.is_symlink():
                _exchange(tmp, out)  # tmp now holds the old output
                _remove(tmp)
            else:
                os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``): a kill at any point
    leaves the old output or the new one at ``b``, never neither. Elsewhere, two renames: a kill
    between them leaves the old output beside ``b`` as ``.<name>.old-*``."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass
    old = temporary_sibling(b, old=True)
    os.replace(b, old / b.name)
    os.replace(a, b)
    os.replace(old / b.name, a)
    old.rmdir()


def _peft_layout(merged: MergedUpdate) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The adapter config template and per-parameter PEFT module info for writing an adapter."""
    peft = merged.meta.get("peft") or {}
    config = dict(peft.get("adapter_config") or {"peft_type": "LORA", "target_modules": None, "bias": "none"})
    layout = dict(peft.get("modules") or {})
    for param in merged.modules:
        if param not in layout:
            if not param.endswith(".weight"):
                raise InputError(f"cannot write {param!r} as a PEFT LoRA module (no template); save with format='weights'")
            layout[param] = {"peft_module": param.removesuffix(".weight"), "transposed": False, "embedding": False}
    return config, layout


def _repacked(modules: Mapping[str, Update], layout: Mapping[str, Mapping[str, Any]]) -> dict[str, LowRank]:
    """The merged updates as PEFT modules: the q/k/v views of one packed in-projection (what
    :func:`~mergelab.checkpoints.load_taskset` makes of an MHA LoRA on a split-attention base, layout
    ``packed: [index, 3]``) joined back into one LoRA on the packed ``in_proj_weight``, keyed by its
    first view.

    ``[ΔW_q; ΔW_k; ΔW_v] = blockdiag(B_q, B_k, B_v) [A_q; A_k; A_v]``: exact, of rank
    ``r_q + r_k + r_v`` (the merged views no longer share ``A``); a view the merge lacks is zero.
    """
    groups: dict[str, dict[int, str]] = {}
    out: dict[str, LowRank] = {}
    for param, update in modules.items():
        packed = layout[param].get("packed")
        if packed is None:
            out[param] = update  # type: ignore[assignment]  # save_merged checked every module is LowRank
        else:
            groups.setdefault(layout[param]["peft_module"], {})[packed[0]] = param
    for views in groups.values():
        parts = [(index, modules[param]) for index, param in sorted(views.items())]
        d, count = parts[0][1].shape[0], layout[views[parts[0][0]]]["packed"][1]
        B = parts[0][1].B.new_zeros(count * d, sum(u.rank for _, u in parts))
        column = 0
        for index, update in parts:
            B[index * d:(index + 1) * d, column:column + update.rank] = update.B
            column += update.rank
        out[views[parts[0][0]]] = LowRank(B, torch.cat([u.A for _, u in parts]))
    return out


def _adapter_tensors(merged: MergedUpdate, layout: Mapping[str, Mapping[str, Any]]) -> tuple[StateDict, dict[str, int]]:
    """PEFT adapter tensors (scaling 1) and the rank of every targeted module.

    Parameters that share one PEFT module (an MHA's packed in_proj and its out_proj) share its
    rank; the lower-rank factor is zero-padded, which leaves ``B @ A`` unchanged.
    """
    modules = _repacked(merged.modules, layout)
    target = lambda p: layout[p]["peft_module"].split(".base_layer", 1)[0]  # noqa: E731
    ranks: dict[str, int] = {}
    for param, update in modules.items():
        ranks[target(param)] = max(ranks.get(target(param), 0), update.rank)
    tensors: StateDict = {}
    for param, update in modules.items():
        info = layout[param]
        B, A = (update.A.T, update.B.T) if info.get("transposed") else (update.B, update.A)
        B = B / info.get("peft_factor", 1.0)  # the installed PEFT multiplies it back (mha_out_proj_factor)
        r = ranks[target(param)]
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1).contiguous()
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], dim=0).contiguous()
        stem = PEFT_PREFIX + info["peft_module"]
        kind_a, kind_b = ("lora_embedding_A", "lora_embedding_B") if info.get("embedding") else ("lora_A.weight", "lora_B.weight")
        tensors[f"{stem}.{kind_a}"], tensors[f"{stem}.{kind_b}"] = A, B
    return tensors, ranks


def parse_size(value: str | int) -> int:
    """A size in bytes from ``--shard-size``: an integer, or a number with a unit of :data:`SIZE_UNITS`
    (``5GB``, ``500MiB``, ``0.5GB``)."""
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("BKMGTI")
    unit = text[len(number):] or "B"
    try:
        size = int(float(number) * SIZE_UNITS[unit])
    except (KeyError, ValueError, OverflowError):  # OverflowError: inf, 1e308GB
        size = 0
    if size < 1:
        raise InputError(f"--shard-size {value!r} is not a size; give bytes or a number with a unit ({', '.join(SIZE_UNITS)}), e.g. 5GB")
    return size


def merged_rank(merged: MergedUpdate) -> int:
    """The largest rank of ``merged``'s matrix modules: a low-rank module's rank, a dense one's full rank
    ``min(out, in)`` (what a serving engine must accept for the merge to be served exactly)."""
    return max((u.rank if isinstance(u, LowRank) else min(u.shape)) for u in merged.modules.values() if len(u.shape) == 2)


def cap_rank(merged: MergedUpdate, max_rank: int) -> tuple[MergedUpdate, dict[str, float]]:
    """Every matrix module of rank above ``max_rank`` replaced by its best rank-``max_rank``
    approximation (Eckart–Young: the top singular triplets of ``ΔW``; from the factors by
    :func:`~mergelab.linalg.lowrank_svd` for a low-rank ``ΔW = B A``, by :func:`~mergelab.linalg.svd64`
    for a dense one), so the merge saves as a PEFT adapter that fits a server's ``max_lora_rank``
    (vLLM, LoRAX) even when the method returned dense updates (TIES in full space). Returns the
    capped merge (``meta["max_rank"]``, ``meta["rank_cap_error"]``) and per truncated module the
    relative error ``‖ΔW − ΔW_R‖_F / ‖ΔW‖_F = sqrt(Σ_{i>R} σ_i² / Σ σ_i²)``. Low-rank modules within
    the cap and non-matrix modules are kept as they are.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise InputError(f"--max-rank {max_rank!r} is not a rank; give an integer >= 1")
    modules: dict[str, Update] = dict(merged.modules)
    errors: dict[str, float] = {}
    for name, update in merged.modules.items():
        if (isinstance(update, LowRank) and update.rank <= max_rank) or len(update.shape) != 2:
            continue
        U, s, Vh = lowrank_svd(update.B, update.A, truncate=False) if isinstance(update, LowRank) else svd64(update.delta)
        total = float(s.square().sum())
        errors[name] = math.sqrt(float(s[max_rank:].square().sum()) / total) if total > 0 else 0.0
        modules[name] = LowRank((U[:, :max_rank] * s[:max_rank]).to(update.dtype), Vh[:max_rank].to(update.dtype))
    meta = {**merged.meta, "max_rank": max_rank, "rank_cap_error": errors}
    return MergedUpdate(modules, merged.base, meta), errors


def save_merged(
    merged: MergedUpdate,
    out: str | os.PathLike[str],
    *,
    format: Literal["peft", "weights"] = "peft",
    base: BaseLike | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    record: Mapping[str, Any] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write a merged update as a PEFT LoRA adapter directory or as merged full weights, with its
    record (``merge.json``) and the model card generated from it (``README.md``, :func:`~mergelab.cards.model_card`).

    ``format="peft"`` needs every module low rank; the adapter's rank per module is the merged
    rank, ``lora_alpha = r`` (scaling 1, rsLoRA off) and the original adapters' target modules,
    ``task_type`` and ``base_model_name_or_path`` are kept. ``format="weights"`` needs ``base``
    and writes ``model.safetensors`` holding ``W_0 + delta`` for every base parameter.
    A ``merge.json`` with the merge's provenance goes into both (with ``completed_directions`` per
    module when a spectral method completed zero singular directions, :mod:`mergelab.merging.completion`,
    and the ``reproducibility`` record of :mod:`mergelab.provenance`).

    ``heads``: per task, the parameters it keeps as its own (a sequence classifier's trained head,
    :func:`~mergelab.checkpoints.saved_modules`). Then ``out/<task>/`` holds one adapter (or
    weights file) per task, the merge plus that task's head (as ``modules_to_save``), and
    ``out/merge.json`` the provenance: ``PeftModel.from_pretrained(base, out/<task>)`` is the
    merged model for that task.

    It takes 9 parameters because it is the one writer of both output formats: after the merge and ``out``, each keyword
    is an output option of ``merge`` / ``adapt`` or what they record (format, base, dtype, overwrite, heads, record,
    shard size).
    """
    info = _merge_info(merged, format, record)
    unsafe = [t for t in heads or {} if not SAFE_NAME.fullmatch(t)]
    if unsafe:
        raise InputError(f"task name {unsafe[0]!r} cannot name a folder of per-task adapters; name tasks with letters, digits, '_.+-'")
    if format == "peft":
        write_one = _peft_writer(merged, dtype)
    elif format == "weights":
        if base is None:
            raise InputError("format='weights' needs the base model; pass base=... (CLI: --base)")
        write_one = _weights_writer(merged.apply(load_state_dict(base)), base, heads, shard_size)
    else:
        raise InputError(f"unknown format {format!r}; choose 'peft' or 'weights'")
    return _publish_dir(Path(out), _output_writer(write_one, heads, info), overwrite)


#: Writes one adapter or weights folder of :func:`save_merged`: the merge plus a task's own parameters (its head).
_WriteOne = Callable[[Path, Mapping[str, torch.Tensor]], None]


def _merge_info(merged: MergedUpdate, format: str, record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Step 1 of :func:`save_merged`: the ``merge.json`` record (the merge's provenance, ``record`` on top)."""
    adapter_config = (merged.meta.get("peft") or {}).get("adapter_config") or {}
    return {"method": merged.meta.get("method"), "space": merged.meta.get("space"),
            "space_options": merged.meta.get("space_options"),
            "hyper_parameters": merged.meta.get("hyper_parameters"), "tasks": merged.meta.get("tasks"),
            "base": merged.base.__dict__, "base_model": adapter_config.get("base_model_name_or_path") or merged.base.name,
            "format": format, "content_hash": merged.content_hash,
            **{k: merged.meta[k] for k in ("max_rank", "rank_cap_error", "completed_directions") if k in merged.meta},
            "reproducibility": merge_reproducibility(merged), **(record or {})}


def _peft_writer(merged: MergedUpdate, dtype: torch.dtype) -> _WriteOne:
    """Step 2 of :func:`save_merged` with ``format="peft"``: the adapter's tensors and config (every module low rank), and its writer."""
    dense = sorted(k for k, u in merged.modules.items() if not isinstance(u, LowRank))
    if dense:
        raise InputError(f"merged update has {len(dense)} dense modules (e.g. {dense[0]!r}), not a LoRA adapter; save with "
                         "format='weights' (CLI: --format weights)")
    template, layout = _peft_layout(merged)
    tensors, ranks = _adapter_tensors(merged, layout)
    r = max(ranks.values())
    config = {**template, "r": r, "lora_alpha": r, "use_rslora": False, "lora_dropout": 0.0,
              "rank_pattern": {k: v for k, v in ranks.items() if v != r}, "alpha_pattern": {k: v for k, v in ranks.items() if v != r},
              "inference_mode": True}
    if not config.get("target_modules"):
        config["target_modules"] = sorted(ranks)

    def write_one(d: Path, own: Mapping[str, torch.Tensor]) -> None:
        own_tensors = {PEFT_PREFIX + k: v for k, v in own.items()}
        save_file({k: v.to(dtype).contiguous() for k, v in {**tensors, **own_tensors}.items()}, str(d / "adapter_model.safetensors"))
        (d / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    return write_one


def _weights_writer(weights: StateDict, base: BaseLike, heads: Mapping[str, Mapping[str, torch.Tensor]] | None,
                    shard_size: int) -> _WriteOne:
    """Step 2 of :func:`save_merged` with ``format="weights"``: the merged weights checked against the shard size and the
    task heads, and how to write one folder (with the base's model files)."""
    smallest = min((t.numel() * t.element_size() for t in weights.values()), default=0)
    if shard_size < smallest:
        warnings.warn(f"--shard-size {shard_size} bytes is below every tensor's size (the smallest has {smallest} bytes), so each of the "
                      f"{len(weights)} tensors is written alone in its own shard; give a size such as 5GB", UserWarning, stacklevel=3)

    foreign = sorted({k for own in (heads or {}).values() for k in own} - set(weights))
    if foreign:
        raise InputError(f"task head {foreign[0]!r} is not a parameter of the base; pass the model the adapters were trained on as --base")

    model_files = [Path(base) / f for f in MODEL_FILES if isinstance(base, (str, os.PathLike)) and (Path(base) / f).is_file()]

    def write_one(d: Path, own: Mapping[str, torch.Tensor]) -> None:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict({**weights, **own}, d, max_shard_size=shard_size)
        for path in model_files:
            shutil.copyfile(path, d / path.name)

    return write_one


def _output_writer(write_one: _WriteOne, heads: Mapping[str, Mapping[str, torch.Tensor]] | None,
                   info: Mapping[str, Any]) -> Callable[[Path], None]:
    """Step 3 of :func:`save_merged`: how to fill the output folder (one folder per task with ``heads``), ``merge.json`` and the card."""

    def write(d: Path) -> None:
        for task, own in (heads or {}).items():
            (d / task).mkdir()
            write_one(d / task, own)
        if not heads:
            write_one(d, {})
        text = json.dumps(info, indent=2, default=str)
        (d / "merge.json").write_text(text)
        (d / CARD).write_text(model_card(json.loads(text)), encoding="utf-8")  # the card of the record as merge.json holds it

    return write
