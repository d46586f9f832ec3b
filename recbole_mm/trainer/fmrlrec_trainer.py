"""FMRLRec's trainer: every evaluation reports every nested size of the one trained model."""
from typing import Dict, List

import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.evaluator import Collector, Evaluator

from recbole_mm.trainer.trainer import MMTrainer


@torch.no_grad()
def evaluate_sizes(model, eval_data, config, collector=None, evaluator=None) -> List[Dict[str, float]]:
    """RecBole full-sort metrics of every nested size, from one encoding pass over ``eval_data``.
    Same masking as RecBole's trainer (padding item and the user's history excluded).
    ``collector`` / ``evaluator``: the largest size's (a trainer passes its own, so whatever watches
    them, such as the per-user metrics of a leaderboard cell, sees the ordinary evaluation)."""
    model.eval()
    collectors = [Collector(config) for _ in model.mrl_sizes[:-1]] + [collector or Collector(config)]
    for interaction, history_index, positive_u, positive_i in eval_data:
        interaction = interaction.to(model.device)
        scores = model.full_sort_predict_per_size(interaction)  # (n_sizes, B, n_items)
        scores[:, :, 0] = -torch.inf
        if history_index is not None:
            scores[:, history_index[0], history_index[1]] = -torch.inf
        for collector, size_scores in zip(collectors, scores):
            collector.eval_batch_collect(size_scores, interaction, positive_u, positive_i)
    smaller_sizes = Evaluator(config)
    evaluators = [smaller_sizes] * (len(collectors) - 1) + [evaluator or smaller_sizes]
    return [dict(e.evaluate(c.get_data_struct())) for e, c in zip(evaluators, collectors)]


class FMRLRecTrainer(MMTrainer):
    """Each full-ranking evaluation scores all of ``mrl_sizes`` from one encoding pass
    (``evaluate_sizes``) and logs them; the largest size's metrics are the evaluation's result (the
    model's ordinary full-sort metrics: early stopping and the test see exactly those).
    ``results_per_size`` holds the last evaluation's ``{size: metrics}`` (the test's, after a run),
    ``best_valid_results_per_size`` the best validation's. Candidate-protocol and multi-process
    evaluations are RecBole's usual single-size ones."""

    results_per_size = None
    best_valid_results_per_size = None

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        per_size = (isinstance(eval_data, FullSortEvalDataLoader) and self.config["single_spec"]
                    and not self.config["candidate_protocol"])
        if not eval_data or not per_size:
            self.results_per_size = None
            return super().evaluate(eval_data, load_best_model, model_file, show_progress)
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            self.load_model_checkpoint(checkpoint_file)
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        results = evaluate_sizes(self.model, eval_data, self.config, self.eval_collector, self.evaluator)
        self.results_per_size = dict(zip(self.model.mrl_sizes, results))
        metric = self.valid_metric.lower()
        self.logger.info("every size, " + metric + ": " + "  ".join(
            f"d={size} {result.get(metric, float('nan')):.4f}" for size, result in self.results_per_size.items()))
        return results[-1]

    def _valid_epoch(self, valid_data, show_progress=False):
        valid_score, valid_result = super()._valid_epoch(valid_data, show_progress)
        # RecBole's early stopping keeps a score that ties or beats the best so far
        better = valid_score >= self.best_valid_score if self.valid_metric_bigger else valid_score <= self.best_valid_score
        if better:
            self.best_valid_results_per_size = self.results_per_size
        return valid_score, valid_result
