"""Task-vector geometry: norms and similarities per module, layer and task (DESIGN §5).

Norms are computed from the factors for low-rank updates (``‖BA‖_F² = tr((BᵀB)(AAᵀ))``),
never from a materialised ``B @ A``. Paper 004 Sec. 4.3 / Fig. 5 uses these norms to show
task-vector imbalance.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from mergelab.naming import module_coords
from mergelab.taskset import TaskSet

__all__ = ["norms"]


def norms(taskset: TaskSet) -> xr.Dataset:
    """Frobenius norm of every task's update per module, and of the whole task vector.

    Returns a Dataset with ``norm(task, module)`` and ``total_norm(task)`` (the L2 norm of the
    concatenated updates), plus ``layer`` / ``kind`` coordinates on ``module``.
    """
    values = np.array([[task.modules[m].norm() for m in taskset.module_names] for task in taskset.tasks])
    ds = xr.Dataset(
        {
            "norm": (("task", "module"), values),
            "total_norm": (("task",), np.sqrt((values**2).sum(axis=1))),
        },
        coords={"task": np.array(taskset.names, dtype=object), **module_coords(taskset.module_names)},
    )
    ds["norm"].attrs = {"long_name": "Frobenius norm of the task update", "definition": "‖ΔW_t‖_F per module"}
    ds["total_norm"].attrs = {"long_name": "L2 norm of the whole task vector", "definition": "sqrt(Σ_modules ‖ΔW_t‖_F²)"}
    return ds
