"""Checkpoints in and out: PEFT LoRA adapters and full fine-tunes -> TaskSet -> merged weights.

``load_taskset(base, sources)`` reads

* PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors`` or
  ``adapter_model.bin``). The scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per-module
  ``rank_pattern`` / ``alpha_pattern``, ``fan_in_fan_out`` and embedding LoRAs are applied here,
  once, so every downstream method sees ``delta = B @ A`` in the base parameter's orientation.
  (The KnOTS and Core Space reference code omit the scaling.)
* full fine-tuned checkpoints (a safetensors state dict, or a directory holding
  ``model.safetensors``) as :class:`~mergelab.taskset.Dense` deltas against the base.

``save_merged(merged, out, format=...)`` writes merged full weights (``model.safetensors``) or,
when every module is low rank, a PEFT LoRA adapter directory that ``PeftModel.from_pretrained``
loads. Both are written to a temporary directory and renamed into place, so a crash never leaves
a half-written output. Adapters with ``modules_to_save`` (a sequence classifier's per-task head)
keep those copies out of the task set (``saved_modules(path)`` reads them); given as ``heads``,
``save_merged`` writes one adapter (or weights file) per task: the merge plus that task's head.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergelab.checkpoints.files import Source, load_grams, load_state_dict
    from mergelab.checkpoints.loading import describe, describe_sources, load_taskset, peft_template, saved_modules, task_heads
    from mergelab.checkpoints.modules import mha_out_proj_factor
    from mergelab.checkpoints.writing import cap_rank, save_merged

__all__ = ["Source", "cap_rank", "describe", "describe_sources", "load_grams", "load_state_dict", "load_taskset",
           "mha_out_proj_factor", "peft_template", "save_merged", "saved_modules", "task_heads"]

#: The submodule defining each public name, imported on first use (PEP 562), so that importing
#: ``mergelab.checkpoints.files`` for metadata (``mergelab check``) loads neither torch nor PEFT.
_DEFINED_IN = {"Source": "files", "load_grams": "files", "load_state_dict": "files", "cap_rank": "writing",
               "save_merged": "writing", "mha_out_proj_factor": "modules",
               **dict.fromkeys(("describe", "describe_sources", "load_taskset", "peft_template", "saved_modules", "task_heads"), "loading")}


def __getattr__(name: str) -> Any:
    if name not in _DEFINED_IN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_DEFINED_IN[name]}"), name)
