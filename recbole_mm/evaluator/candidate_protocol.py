"""Rank any RecBole model on the fixed candidate sets of the LLM protocol (Speeder Sec. 3.1).

``with_candidate_protocol(TrainerClass)`` returns a trainer whose full-sort evaluation keeps each
sample's scores only on its fixed candidate set (``recbole_mm.data.candidates``; same
``num_candidates`` / ``candidate_seed`` as Speeder, so SASRec, MMSASRec and Speeder answer on
identical sets). Evaluate with ``metrics: [HR, ValidRatio, VHR]`` (a ranking model always answers
validly, so ValidRatio = 1 and VHR@1 = HR@1), or RecBole's ranking metrics over the candidates.

``candidate_file: <file>`` (relative to the dataset folder) takes the sets from a file instead
(``recbole_mm.data.candidates.CandidateFile``, e.g. LLMRank's ``lastfm.random``); only the samples
the file covers are evaluated (logged once per evaluation set), as in LLMRank's selected users.
"""

from functools import lru_cache
from pathlib import Path

import torch

from recbole_mm.data.candidates import CandidateFile, CandidateSampler, restrict_scores_to_candidates
from recbole_mm.utils import RecboleMMError

DEFAULT_NUM_CANDIDATES = 5
DEFAULT_CANDIDATE_SEED = 2020


def _config_value(config, key):
    return config[key] if key in config else None


def candidate_sampler_from_config(config, n_items):
    num_candidates = _config_value(config, "num_candidates")
    seed = _config_value(config, "candidate_seed")
    return CandidateSampler(
        n_items,
        DEFAULT_NUM_CANDIDATES if num_candidates is None else num_candidates,
        DEFAULT_CANDIDATE_SEED if seed is None else seed,
    )


def candidate_source_from_config(config, dataset):
    """The evaluation candidate source of a run: ``candidate_file`` if set, else the seeded sampler."""
    candidate_file = _config_value(config, "candidate_file")
    if not candidate_file:
        return candidate_sampler_from_config(config, dataset.item_num)
    path = Path(candidate_file)
    if not path.is_absolute():
        path = Path(config["data_path"]) / path
    seed = _config_value(config, "candidate_seed")
    return CandidateFile(
        path,
        dataset.field2token_id[dataset.uid_field],
        dataset.field2token_id[dataset.iid_field],
        _config_value(config, "num_candidates"),
        DEFAULT_CANDIDATE_SEED if seed is None else seed,
    )


class CandidateProtocolMixin:
    def prepare_candidate_source(self, dataset):
        """Read ``candidate_file`` (or set up the sampler) now, so that a bad file stops the run before
        training rather than at the first evaluation."""
        self._candidate_source = candidate_source_from_config(self.config, dataset)

    def evaluate(self, eval_data, *args, **kwargs):
        if eval_data and getattr(self, "_candidate_source", None) is None:
            self._candidate_source = candidate_source_from_config(self.config, eval_data._dataset)
        self._uncovered_rows = self._evaluated_rows = 0
        result = super().evaluate(eval_data, *args, **kwargs)
        if self._uncovered_rows:
            self.logger.info(f"candidate_file covers {self._evaluated_rows} of "
                             f"{self._evaluated_rows + self._uncovered_rows} evaluation samples: metrics are over those.")
        return result

    def _full_sort_batch_eval(self, batched_data):
        users_field, item_field = self.config["USER_ID_FIELD"], self.config["ITEM_ID_FIELD"]
        history_field = item_field + self.config["LIST_SUFFIX"]
        source = getattr(self, "_candidate_source", None)
        if isinstance(source, CandidateFile):
            interaction, history_index, positive_u, positive_i = batched_data
            if history_index is not None:
                raise RecboleMMError("candidate_file works with sequential models only (one target per sample).")
            covered = source.covers(interaction[users_field], interaction[item_field]).cpu()
            self._uncovered_rows += int((~covered).sum())
            self._evaluated_rows += int(covered.sum())
            kept = covered.nonzero().flatten()
            interaction = interaction[kept]
            if len(kept) == 0:  # nothing to ask the model; the collector takes an empty batch
                empty = torch.zeros(0, dtype=torch.long)
                return interaction, torch.zeros(0, self.tot_item_num), empty, empty
            batched_data = (interaction, None, torch.arange(len(kept)), interaction[item_field])
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if source is None:  # called outside evaluate(): the seeded sampler over the scored catalogue
            source = candidate_sampler_from_config(self.config, scores.shape[1])
        candidates, _ = source.evaluation_candidates(
            interaction[users_field], interaction[history_field], interaction[item_field]
        )
        return interaction, restrict_scores_to_candidates(scores, candidates.to(scores.device)), positive_u, positive_i


@lru_cache(maxsize=None)
def with_candidate_protocol(trainer_class):
    return type(f"Candidate{trainer_class.__name__}", (CandidateProtocolMixin, trainer_class), {})
