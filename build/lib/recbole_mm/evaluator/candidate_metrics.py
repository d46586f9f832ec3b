"""Candidate-protocol metrics (Speeder Sec. 3.1) as RecBole metrics: ``HR@1``, ``ValidRatio``, ``VHR@1``.

They read the evaluated score matrix, which on this protocol is finite only on the sample's
candidate set (``recbole_mm.data.candidates.restrict_scores_to_candidates`` for ranking models;
Speeder's ``full_sort_predict`` directly). A row with no finite score is an *invalid answer* (a
generated reply that names no single candidate). With hits = valid rows whose top-1 item is the
target:

- ``ValidRatio`` = valid rows / rows;
- ``HR@1`` = hits / valid rows (accuracy among valid answers: the paper's Table 2 has HR@1 above
  ValidRatio for Llama2, so HR@1 cannot be counted over all rows);
- ``VHR@1`` = ValidRatio x HR@1 = hits / rows.

Use with ``metrics: [HR, ValidRatio, VHR]``, ``topk: [1]`` (any topk list works: only the top-1
column is read), ``valid_metric: VHR@1``.
"""

import numpy as np
import torch
from recbole.evaluator import register as recbole_register
from recbole.evaluator.base_metric import AbstractMetric
from recbole.utils import EvaluatorType


def candidate_answers(dataobject):
    """(hit, valid) boolean arrays over the evaluated rows."""
    scores = dataobject.get("rec.score")
    top1_is_target = dataobject.get("rec.topk")[:, 0].to(torch.bool)
    valid = torch.isfinite(scores).any(dim=1)
    return (top1_is_target & valid).numpy(), valid.numpy()


class _CandidateMetric(AbstractMetric):
    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.topk", "rec.score"]
    key = ""

    def value(self, hit: np.ndarray, valid: np.ndarray) -> float:
        raise NotImplementedError

    def calculate_metric(self, dataobject):
        hit, valid = candidate_answers(dataobject)
        return {self.key: round(float(self.value(hit, valid)), self.decimal_place)}


class HR(_CandidateMetric):
    """HR@1 among valid answers."""

    key = "hr@1"

    def value(self, hit, valid):
        return hit.sum() / max(valid.sum(), 1)


class ValidRatio(_CandidateMetric):
    """Fraction of rows whose answer names exactly one candidate."""

    key = "validratio"

    def value(self, hit, valid):
        return valid.mean()


class VHR(_CandidateMetric):
    """VHR@1 = ValidRatio x HR@1."""

    key = "vhr@1"

    def value(self, hit, valid):
        return hit.mean()


CANDIDATE_METRICS = (HR, ValidRatio, VHR)


def register_candidate_metrics():
    """Make the metrics known to RecBole's Config check, Register and Evaluator (idempotent).

    RecBole builds its metric tables once from ``recbole.evaluator.metrics``; extending those
    module-level dicts is its only extension point.
    """
    for metric in CANDIDATE_METRICS:
        name = metric.__name__.lower()
        recbole_register.metrics_dict[name] = metric
        recbole_register.metric_information[name] = metric.metric_need
        recbole_register.metric_types[name] = metric.metric_type
