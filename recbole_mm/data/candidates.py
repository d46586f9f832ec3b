"""Candidate sets of the LLM candidate-ranking protocol (Speeder / LLaRA) and PPT proxy prompts.

Protocol (Speeder Sec. 3.1): each sample is ranked against ``num_candidates`` items, the target plus
random items the user has not interacted with (not in the sample's history, never the padding
item 0), the target at a uniformly random slot.

- Training candidates are resampled on every call from one generator seeded once.
- Evaluation candidates depend only on ``(seed, user, target, history length)``: the same sample
  gets the same candidate set in every run, batch order and batch size, and for every model (so
  SASRec / MMSASRec can be ranked on exactly the sets Speeder answers on).

``CandidateFile`` replaces the sampled evaluation sets by fixed ones read from a file (LLMRank's
``<dataset>.random``, a converter's export of ReChorus' sampled negatives): the negatives come from
the file, only the target's slot is drawn (from the same seed).
"""

from collections import defaultdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from recbole_mm.utils import RecboleMMError


class CandidateSettingError(RecboleMMError, ValueError):
    """``num_candidates`` cannot work (too small, or more than the catalogue offers): a clean error at
    the command line, a ValueError for callers that catch those."""


def _row_items(history_row) -> List[int]:
    """Real (non-padding) item ids of one right-padded history row, in order."""
    return [int(item) for item in history_row if int(item) != 0]


class CandidateSampler:
    """Builds candidate sets for ``n_items`` items (RecBole internal ids, 0 = padding)."""

    def __init__(self, n_items: int, num_candidates: int = 5, seed: int = 2020):
        if num_candidates < 2:
            raise CandidateSettingError(f"num_candidates={num_candidates}: a candidate set needs the target and at least "
                                        "one negative; set num_candidates to 2 or more.")
        self.n_items = int(n_items)
        self.num_candidates = int(num_candidates)
        self.seed = int(seed)
        self.training_rng = np.random.default_rng(self.seed)

    def sample_row(self, history: Sequence[int], target: int, rng) -> Tuple[List[int], int]:
        """One candidate set: (candidate ids, slot of the target)."""
        excluded = set(history) | {int(target), 0}
        available = self.n_items - len(excluded)
        n_negatives = self.num_candidates - 1
        if available < n_negatives:
            raise CandidateSettingError(
                f"only {available} items are outside this history (n_items={self.n_items}): "
                f"num_candidates={self.num_candidates} needs {n_negatives} negatives; lower num_candidates."
            )
        negatives: List[int] = []
        chosen = set(excluded)
        while len(negatives) < n_negatives:
            # Histories are short next to the catalogue, so rejection sampling needs few draws.
            for item in rng.integers(1, self.n_items, size=2 * n_negatives):
                item = int(item)
                if item not in chosen:
                    chosen.add(item)
                    negatives.append(item)
                    if len(negatives) == n_negatives:
                        break
        label = int(rng.integers(0, self.num_candidates))
        candidates = negatives[:label] + [int(target)] + negatives[label:]
        return candidates, label

    def _batch(self, histories, targets, rngs):
        rows, labels = [], []
        for history_row, target, rng in zip(histories.tolist(), targets.tolist(), rngs):
            candidates, label = self.sample_row(_row_items(history_row), target, rng)
            rows.append(candidates)
            labels.append(label)
        device = targets.device
        return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(labels, dtype=torch.long, device=device)

    def training_candidates(self, histories: torch.Tensor, targets: torch.Tensor):
        """Fresh candidates: (B, m) ids and (B,) target slots. histories (B, L) right-padded."""
        return self._batch(histories, targets, [self.training_rng] * len(targets))

    def evaluation_rng(self, user: int, target: int, history_length: int):
        return np.random.default_rng([self.seed, int(user), int(target), int(history_length)])

    def evaluation_candidates(self, users: torch.Tensor, histories: torch.Tensor, targets: torch.Tensor):
        """Candidates fixed by ``(seed, user, target, history length)``: identical across runs."""
        lengths = (histories != 0).sum(dim=1).tolist()
        rngs = [self.evaluation_rng(u, t, n) for u, t, n in zip(users.tolist(), targets.tolist(), lengths)]
        return self._batch(histories, targets, rngs)


class CandidateFile:
    """Fixed evaluation candidate sets from a text file, one line per user or per sample:

        <user token>\t<item token> <item token> ...                  the same negatives for every target of the user
        <user token>\t<target item token>\t<item token> ...         negatives of that (user, target) sample

    (tokens as in the dataset's atomic files; LLMRank's ``lastfm.random`` is the first form). A sample's
    set is the first ``num_candidates - 1`` listed items other than its target (the target is dropped
    from the list where it occurs, as LLMRank does), plus the target at a slot drawn from
    ``(seed, user, target, history length)``; ``num_candidates=None`` uses every listed item. Only the
    samples whose key the file lists can be evaluated (``covers``); the candidate-protocol trainer
    evaluates exactly those.

    Every problem of the file is an error naming the file, its lines and the fix: unknown users or items
    (the file belongs to another dataset or filtering), an item listed twice in a line, a key on two
    lines, a line with too few items, a malformed line. Nothing is skipped or guessed.
    """

    MAX_NAMED = 5

    def __init__(self, path, user_token2id, item_token2id, num_candidates=None, seed=2020):
        self.path = Path(path)
        self.num_candidates = None if num_candidates is None else int(num_candidates)
        if self.num_candidates is not None and self.num_candidates < 2:
            raise CandidateSettingError(f"num_candidates={num_candidates}: a candidate set needs the target and at least "
                                        "one negative; set num_candidates to 2 or more (or ~ for every listed item).")
        self.seed = int(seed)
        if not self.path.is_file():
            raise RecboleMMError(f"candidate_file {self.path} does not exist; give a path relative to the dataset folder or an absolute one.")
        self.lists, self.per_sample = self._read(user_token2id, item_token2id)

    def _lines(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                return list(enumerate(handle, 1))
        except UnicodeDecodeError as error:
            raise RecboleMMError(f"candidate_file {self.path} is not UTF-8 text ({error.reason} at byte {error.start}): "
                                 "regenerate it for this dataset (converter).") from None

    def _read(self, user_token2id, item_token2id):
        lists, problems, widths = {}, defaultdict(list), set()
        for line_number, line in self._lines():
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            where = f"{self.path.name}:{line_number}"
            if len(fields) not in (2, 3) or not fields[-1].split():
                problems["malformed lines (need user<TAB>items or user<TAB>target<TAB>items)"].append(where)
                continue
            widths.add(len(fields))
            user = user_token2id.get(fields[0])
            if user is None:
                problems["users unknown to the dataset"].append(f"{where} ({fields[0]})")
                continue
            tokens = fields[-1].split()
            unknown = [token for token in tokens if token not in item_token2id]
            if unknown:
                problems["items unknown to the dataset"].append(f"{where} ({unknown[0]}, {len(unknown)} in the line)")
                continue
            if len(set(tokens)) != len(tokens):
                problems["lines listing an item twice"].append(where)
                continue
            key = user
            if len(fields) == 3:
                if fields[1] not in item_token2id:
                    problems["items unknown to the dataset"].append(f"{where} (target {fields[1]})")
                    continue
                key = (user, item_token2id[fields[1]])
            if key in lists:
                problems["keys (user or user+target) on more than one line"].append(where)
                continue
            lists[key] = np.array([item_token2id[token] for token in tokens], dtype=np.int64)
        if len(widths) > 1:
            problems["a mix of 2- and 3-field lines"].append(self.path.name)
        if not lists and not problems:
            problems["no candidate line"].append(self.path.name)
        if problems:
            detail = "; ".join(f"{kind}: {len(where)} (first: {', '.join(where[:self.MAX_NAMED])})"
                               for kind, where in problems.items())
            raise RecboleMMError(f"candidate_file {self.path}: {detail}. The file must list tokens of this dataset's "
                                 "atomic files; regenerate it for this dataset (converter) or fix those lines.")
        return lists, widths == {3}

    def _key(self, user, target):
        return (int(user), int(target)) if self.per_sample else int(user)

    def covers(self, users: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the file lists candidates for the sample."""
        keys = [self._key(u, t) for u, t in zip(users.tolist(), targets.tolist())]
        return torch.tensor([key in self.lists for key in keys], dtype=torch.bool, device=users.device)

    def evaluation_candidates(self, users: torch.Tensor, histories: torch.Tensor, targets: torch.Tensor):
        """(B, m) ids and (B,) target slots for samples the file covers (an error for any other)."""
        lengths = (histories != 0).sum(dim=1).tolist()
        rows, labels, short = [], [], []
        for user, target, length in zip(users.tolist(), targets.tolist(), lengths):
            key = self._key(user, target)
            if key not in self.lists:
                raise RecboleMMError(f"candidate_file {self.path} has no candidates for internal user id {user}"
                                     f"{'' if not self.per_sample else f' and target {target}'}; evaluate only covered samples.")
            negatives = self.lists[key][self.lists[key] != target]
            size = len(negatives) + 1 if self.num_candidates is None else self.num_candidates
            if len(negatives) < size - 1:
                short.append(user)
                continue
            label = int(np.random.default_rng([self.seed, int(user), int(target), int(length)]).integers(0, size))
            negatives = negatives[: size - 1].tolist()
            rows.append(negatives[:label] + [int(target)] + negatives[label:])
            labels.append(label)
        if short:
            raise RecboleMMError(f"candidate_file {self.path}: internal users {short[:self.MAX_NAMED]} ({len(short)} in this batch) "
                                 f"list fewer than num_candidates - 1 = {self.num_candidates - 1} items besides the "
                                 "target; lower num_candidates.")
        # num_candidates=None: every listed item, so sets may differ in size (ReChorus' negatives, drawn with
        # replacement, are 91-99 distinct items); pad with the target, which leaves each set as it is.
        width = max(len(row) for row in rows)
        rows = [row + [row[label]] * (width - len(row)) for row, label in zip(rows, labels)]
        device = targets.device
        return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(labels, dtype=torch.long, device=device)


def restrict_scores_to_candidates(scores: torch.Tensor, candidates: torch.Tensor):
    """Full-catalogue scores (B, n_items) -> the same scores on the candidates, -inf elsewhere.

    RecBole's full-sort evaluator then ranks only inside the candidate set (HR@1 = top-1 is the
    target), which is how non-generative baselines are scored on the protocol.
    """
    restricted = torch.full_like(scores, float("-inf"))
    return restricted.scatter(1, candidates, scores.gather(1, candidates))


# ----------------------------------------------------------------------------------------------
# Position Proxy Task (PPT, paper Sec. 2.4, eqs. 13-14)
# ----------------------------------------------------------------------------------------------
def position_proxy_example(history: Sequence[int], rng) -> Optional[Tuple[List[int], bool]]:
    """Three distinct history items (a, b, c) in random order and the eq. 14 label.

    label = |pos_a - pos_b| <= |pos_b - pos_c| ("yes"), positions in the history. An item that
    occurs more than once is placed at its most recent occurrence. ``None`` when the history has
    fewer than 3 distinct items (the paper discards those sequences).
    """
    last_position = {}
    for position, item in enumerate(_row_items(history)):
        last_position[item] = position
    if len(last_position) < 3:
        return None
    distinct = list(last_position)
    picked = [distinct[i] for i in rng.choice(len(distinct), size=3, replace=False)]
    a, b, c = (last_position[item] for item in picked)
    return picked, abs(a - b) <= abs(b - c)


def position_proxy_batch(histories: torch.Tensor, rng):
    """PPT examples for the rows of ``histories`` that qualify: (row indices, (K, 3) items, (K,) labels)."""
    rows, triples, labels = [], [], []
    for row, history_row in enumerate(histories.tolist()):
        example = position_proxy_example(history_row, rng)
        if example is not None:
            rows.append(row)
            triples.append(example[0])
            labels.append(example[1])
    device = histories.device
    return (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(triples, dtype=torch.long, device=device).reshape(-1, 3),
        torch.tensor(labels, dtype=torch.bool, device=device),
    )
