"""mergelab: merging fine-tuned models and LoRA adapters in full, KnOTS and Core space.

The library is pure and importable: no Prefect, Jupyter or seaborn imports live under
``mergelab``. The public API is what its ``__all__`` lists.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergelab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
