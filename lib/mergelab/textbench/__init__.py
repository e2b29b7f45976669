"""Building the real-weights text benchmark: rows from pinned Debian packages, PEFT LoRA adapters on
all-MiniLM-L6-v2, export.

``build_text(out, store, profile)`` runs every step through the store's content keys, so a rerun
is a no-op and an interrupted build resumes; ``mergelab build-text`` is its command line. The
exported folder is read by the ``sentence_encoder`` bench (``bench.kind: sentence_encoder``).
"""
