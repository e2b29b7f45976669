"""Evaluation: zero-shot heads, per-task / normalised / joint metrics, dense decoders."""

from mergelab.evaluation.dense import KINDS, refit_score
from mergelab.evaluation.heads import image_logits, joint_head, task_head, zero_shot_head
from mergelab.evaluation.metrics import (evaluate_task, evaluate_tasks, hits_at_k, joint_hit_counts, joint_hits,
                                         normalized_accuracy, normalized_performance, predict, top1_accuracy)

__all__ = ["KINDS", "evaluate_task", "evaluate_tasks", "hits_at_k", "image_logits", "joint_head", "joint_hit_counts",
           "joint_hits", "normalized_accuracy", "normalized_performance", "predict", "refit_score", "task_head",
           "top1_accuracy", "zero_shot_head"]
