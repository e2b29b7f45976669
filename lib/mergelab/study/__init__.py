"""The nodes of a study, each cached in the store under a content key.

Each node kind is one :class:`Node` (kind, code version, key, compute): the key is built from
keys and hashes only, so probing a study (:func:`up_to_date`) computes keys and nothing else.
``flows/`` wraps every node kind in a Prefect task; nothing here imports Prefect. A node takes the
run :class:`Run` and its own inputs (plain values or other nodes' results), so it runs the same
in a thread, an in-process Dask worker or a remote one, and returns a :class:`NodeResult` that says
whether the store already held its artifact. :func:`run_graph` walks them in dependency order, all
or by :data:`PHASES`.

| node        | key inputs                                                 | artifact |
|-------------|------------------------------------------------------------|----------|
| stage       | TaskSet content hash, bench data id                         | JSON: tasks, hashes, sources |
| reference   | the task's update hash, base hash, data id                  | Dataset: fine-tuned / zero-shot scores |
| merge       | TaskSet hash, method, space, resolved hyper-parameters      | tensors: the MergedUpdate (+ wall time, peak memory) |
| adapt       | TaskSet hash, data id, the adaptive spec, seed              | tensors: the MergedUpdate; Dataset: its history |
| evaluate    | the merged artifact's key, data id, metrics asked for       | Dataset ``score(task, metric)`` |
| analysis    | the registry entry's producer/version, its inputs           | Dataset (``studies/<name>/analysis/<a>``) |
| adaptation_study | the entry's producer/version, TaskSet hash, data id, settings, seed | Dataset (``studies/<name>/<ref>``) |
| results     | every evaluation's key, the selection rule                  | Dataset ``studies/<name>/results`` |

Changing one hyper-parameter changes one merge key, hence its evaluation and the results, and
nothing else. Changed adapters change the TaskSet hash and every key below it.
"""

from mergelab.study.run import JOINT, JOINT_KS, AdaptJob, Run, MergeJob, Node, NodeResult, adapt_jobs, shared_run, merge_jobs
from mergelab.study.graph import (NODES, PHASES, Submit, analyses_up_to_date, analysis_graph, local_submit, run_graph,
                                  selected_for_analyses, up_to_date)
from mergelab.study.results import Row, adapt_row, grid_edges, merge_row, results_table, selected_merges, unselected


__all__ = ["JOINT", "JOINT_KS", "NODES", "PHASES", "AdaptJob", "Run", "MergeJob", "Node", "NodeResult", "Row", "Submit",
           "adapt_jobs", "adapt_row", "analyses_up_to_date", "analysis_graph", "shared_run", "grid_edges", "local_submit",
           "merge_jobs", "merge_row", "results_table", "run_graph", "selected_for_analyses", "selected_merges", "unselected",
           "up_to_date"]
