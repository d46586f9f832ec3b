"""Rank any RecBole model on the fixed candidate sets of the LLM protocol (Speeder Sec. 3.1).

``with_candidate_protocol(TrainerClass)`` returns a trainer whose full-sort evaluation keeps each
sample's scores only on its fixed candidate set (``recbole_mm.data.candidates``; same
``num_candidates`` / ``candidate_seed`` as Speeder, so SASRec, MMSASRec and Speeder answer on
identical sets). Evaluate with ``metrics: [HR, ValidRatio, VHR]`` (a ranking model always answers
validly, so ValidRatio = 1 and VHR@1 = HR@1).
"""

from functools import lru_cache

from recbole_mm.data.candidates import CandidateSampler, restrict_scores_to_candidates

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


class CandidateProtocolMixin:
    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        sampler = candidate_sampler_from_config(self.config, scores.shape[1])
        history_field = self.config["ITEM_ID_FIELD"] + self.config["LIST_SUFFIX"]
        candidates, _ = sampler.evaluation_candidates(
            interaction[self.config["USER_ID_FIELD"]], interaction[history_field], interaction[self.config["ITEM_ID_FIELD"]]
        )
        return interaction, restrict_scores_to_candidates(scores, candidates.to(scores.device)), positive_u, positive_i


@lru_cache(maxsize=None)
def with_candidate_protocol(trainer_class):
    return type(f"Candidate{trainer_class.__name__}", (CandidateProtocolMixin, trainer_class), {})
