"""Checkpoints in and out: PEFT LoRA adapters and full fine-tunes -> TaskSet -> merged weights.

``load_taskset(base, sources)`` reads

* PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors`` or
  ``adapter_model.bin``). The scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per-module
  ``rank_pattern`` / ``alpha_pattern``, ``fan_in_fan_out`` and embedding LoRAs are applied here,
  once, so every downstream method sees ``delta = B @ A`` in the base parameter's orientation.
  (The KnOTS and Core Space reference code omit the scaling; REFERENCES §1.1.)
* full fine-tuned checkpoints (a safetensors state dict, or a directory holding
  ``model.safetensors``) as :class:`~mergelab.taskset.Dense` deltas against the base.

``save_merged(merged, out, format=...)`` writes merged full weights (``model.safetensors``) or,
when every module is low rank, a PEFT LoRA adapter directory that ``PeftModel.from_pretrained``
loads. Both are written to a temporary directory and renamed into place, so a crash never leaves
a half-written output. Adapters with ``modules_to_save`` (a sequence classifier's per-task head)
keep those copies out of the task set (``saved_modules(path)`` reads them); given as ``heads``,
``save_merged`` writes one adapter (or weights file) per task: the merge plus that task's head.
"""

from mergelab.checkpoints.files import Source, load_grams, load_state_dict
from mergelab.checkpoints.loading import (describe, describe_sources, load_taskset, mha_out_proj_factor, peft_template, saved_modules,
                                        task_heads)
from mergelab.checkpoints.writing import cap_rank, save_merged

__all__ = ["Source", "cap_rank", "describe", "describe_sources", "load_grams", "load_state_dict", "load_taskset",
           "mha_out_proj_factor", "peft_template", "save_merged", "saved_modules", "task_heads"]
