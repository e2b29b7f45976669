"""Figure builders: store -> tidy xarray/pandas -> matplotlib figures.

Notebooks import this package first. Kernels without ipywidgets (``mergelab report``'s, a bare
JupyterLab) would print tqdm's "IProgress not found" warning under the first cell that imports a
library using ``tqdm.auto``; it says nothing about the figures, so it is silenced here (that message only).
"""

import warnings

warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
