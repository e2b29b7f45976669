"""mergelab: merging fine-tuned models and LoRA adapters in full, KnOTS and Core space.

The library is pure and importable: no Prefect, Jupyter or seaborn imports live under
``mergelab``. See DESIGN §10 for the public API.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergelab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
