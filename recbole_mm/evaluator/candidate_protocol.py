"""Rank any RecBole model on fixed candidate sets instead of the whole catalogue.

``with_candidate_protocol(TrainerClass)`` returns a trainer whose full-sort evaluation keeps each
sample's scores only on its candidate set, which comes from one of two places:

- sampled (Speeder Sec. 3.1, ``recbole_mm.data.candidates.CandidateSampler``): the target plus
  ``num_candidates - 1`` random items, fixed by ``candidate_seed``, so SASRec, MMSASRec and Speeder
  answer on identical sets; evaluate with ``metrics: [HR, ValidRatio, VHR]``, ``topk: [1]``;
- a file (``candidate_file``, ``recbole_mm.data.candidates.FileCandidateSets``): a benchmark's own
  sets, e.g. ReChorus' target + 99 sampled negatives per dev/test row; evaluate with RecBole's
  ``metrics: [Hit, NDCG]`` (HR@k / NDCG@k over the set).

A ranking model always answers validly, so ValidRatio = 1 and VHR@1 = HR@1.
"""

from functools import lru_cache
from pathlib import Path

from recbole_mm.data.candidates import CandidateSampler, FileCandidateSets, restrict_scores_to_candidates

DEFAULT_NUM_CANDIDATES = 5
DEFAULT_CANDIDATE_SEED = 2020


def candidate_sampler_from_config(config, n_items):
    num_candidates = config["num_candidates"] if "num_candidates" in config else None
    seed = config["candidate_seed"] if "candidate_seed" in config else None
    return CandidateSampler(
        n_items,
        DEFAULT_NUM_CANDIDATES if num_candidates is None else num_candidates,
        DEFAULT_CANDIDATE_SEED if seed is None else seed,
    )


def candidate_file_path(config):
    """``candidate_file`` as configured: relative paths are inside the dataset folder; None when unset."""
    name = config["candidate_file"] if "candidate_file" in config else None
    if not name:
        return None
    path = Path(name)
    return path if path.is_absolute() else Path(config["data_path"]) / path


class CandidateProtocolMixin:
    def evaluate(self, eval_data, *args, **kwargs):
        path = candidate_file_path(self.config)
        if path is not None and eval_data:
            if getattr(self, "_file_candidates", None) is None or self._file_candidates.path != path:
                self._file_candidates = FileCandidateSets.read(path)
            self._file_candidates.bind(eval_data._dataset)
        return super().evaluate(eval_data, *args, **kwargs)

    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if candidate_file_path(self.config) is not None:
            source = self._file_candidates
        else:
            source = candidate_sampler_from_config(self.config, scores.shape[1])
        history_field = self.config["ITEM_ID_FIELD"] + self.config["LIST_SUFFIX"]
        candidates, _ = source.evaluation_candidates(
            interaction[self.config["USER_ID_FIELD"]], interaction[history_field], interaction[self.config["ITEM_ID_FIELD"]]
        )
        return interaction, restrict_scores_to_candidates(scores, candidates.to(scores.device)), positive_u, positive_i


@lru_cache(maxsize=None)
def with_candidate_protocol(trainer_class):
    return type(f"Candidate{trainer_class.__name__}", (CandidateProtocolMixin, trainer_class), {})
