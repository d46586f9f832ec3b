"""Per-user test metrics of a run, for paired significance tests between models.

RecBole's evaluator averages each metric over the evaluated users; its top-k metrics compute the
per-user values first (``metric_info``), so the same numbers are kept here before the mean, with
the user each row belongs to. Candidate-protocol runs keep each user's top-1 hit as ``vhr@1`` (the
terms VHR@1 averages, so a leaderboard's ``metric: vhr@1`` names both the table column and the pairs).
"""
import numpy as np
from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.register import metrics_dict

from recbole_mm.evaluator.candidate_metrics import candidate_answers


def per_user_values(config, struct):
    """``{metric@k: (n_users,) float array}`` for the run's top-k metrics (and ``vhr@1`` under the
    candidate protocol), computed from the evaluator's data struct as RecBole's metrics do."""
    values = {}
    for name in config["metrics"]:
        metric_class = metrics_dict[name.lower()]
        if issubclass(metric_class, TopkMetric):
            metric = metric_class(config)
            pos_index, pos_len = metric.used_info(struct)
            rows = metric.metric_info(pos_index, pos_len)
            for k in config["topk"]:
                values[f"{name.lower()}@{k}"] = np.asarray(rows[:, k - 1], dtype=np.float64)
    if config["candidate_protocol"]:
        hit, _ = candidate_answers(struct)
        values["vhr@1"] = hit.astype(np.float64)
    return values


class PerUserRecorder:
    """Attached to a trainer: after each evaluation, ``users`` holds the evaluated users' tokens and
    ``values`` their metrics, in the order the evaluator saw them (the last evaluation is the test)."""

    def __init__(self, config, trainer, dataset):
        self.users, self.values = None, None
        self._batch_users = []
        user_field = config["USER_ID_FIELD"]
        tokens = dataset.field2id_token[user_field]
        collect, evaluate = trainer.eval_collector.eval_batch_collect, trainer.evaluator.evaluate

        def recording_collect(scores, interaction, positive_u, positive_i):
            self._batch_users.append(interaction[user_field].cpu().numpy())
            return collect(scores, interaction, positive_u, positive_i)

        def recording_evaluate(struct):
            result = evaluate(struct)
            self.values = per_user_values(config, struct)
            ids = np.concatenate(self._batch_users) if self._batch_users else np.array([], dtype=np.int64)
            self._batch_users = []
            lengths = {len(array) for array in self.values.values()}
            if lengths != {len(ids)}:  # rows that are not one per user cannot be paired across models
                raise RuntimeError(f"per-user metrics: {len(ids)} evaluated users but metric rows {sorted(lengths)}")
            self.users = [str(token) for token in tokens[ids]]
            return result

        trainer.eval_collector.eval_batch_collect = recording_collect
        trainer.evaluator.evaluate = recording_evaluate
