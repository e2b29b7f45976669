"""Building the micro benchmark: contrastive pre-training, PEFT LoRA and dense fine-tuning, export.

``build_micro(out, store, profile)`` runs every step through the store's content keys, so a
rerun is a no-op; ``mergelab build-micro`` is its command line. The built benchmark is read back
with :func:`mergelab.micro.benchmark.load_micro`.
"""
