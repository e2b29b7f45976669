"""Per-layer, per-module statistics of task sets as xarray Datasets (DESIGN §5)."""
