"""Candidate sets of the LLM candidate-ranking protocol (Speeder / LLaRA) and PPT proxy prompts.

Protocol (Speeder Sec. 3.1): each sample is ranked against ``num_candidates`` items, the target plus
random items the user has not interacted with (not in the sample's history, never the padding
item 0), the target at a uniformly random slot.

- Training candidates are resampled on every call from one generator seeded once.
- Evaluation candidates depend only on ``(seed, user, target, history length)``: the same sample
  gets the same candidate set in every run, batch order and batch size, and for every model (so
  SASRec / MMSASRec can be ranked on exactly the sets Speeder answers on).
- Or the evaluation sets come from a file (``FileCandidateSets``): a benchmark's published negatives
  (ReChorus' 99 per dev/test row, LLMRank's ``lastfm.random``), so every model ranks exactly those.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from recbole_mm.utils import RecboleMMError


def _row_items(history_row) -> List[int]:
    """Real (non-padding) item ids of one right-padded history row, in order."""
    return [int(item) for item in history_row if int(item) != 0]


class CandidateSampler:
    """Builds candidate sets for ``n_items`` items (RecBole internal ids, 0 = padding)."""

    def __init__(self, n_items: int, num_candidates: int = 5, seed: int = 2020):
        if num_candidates < 2:
            raise ValueError(f"num_candidates={num_candidates}: a candidate set needs the target and at least one negative.")
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
            raise ValueError(
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


class FileCandidateSets:
    """Evaluation candidate sets given by a file, one set per (user, target item).

    File: tab-separated with a header naming at least ``user_id``, ``item_id`` (the target) and
    ``candidates`` (space-separated item tokens, the target among them); RecBole type suffixes
    (``user_id:token``) and further columns are allowed. Tokens are the dataset's own user/item
    tokens. A token repeated in one set counts once (RecBole ranks items, not list entries).
    """

    def __init__(self, sets: Dict[Tuple[str, str], List[str]], path):
        self.sets = sets
        self.path = Path(path)
        self._internal = None

    @classmethod
    def read(cls, path, user_field="user_id", item_field="item_id", candidates_field="candidates"):
        path = Path(path)
        if not path.is_file():
            raise RecboleMMError(f"candidate_file: {path} does not exist; write it with the dataset's converter "
                                 "(dataset_conversion/) or fix candidate_file in your config.")
        sets = {}
        with open(path, encoding="utf-8") as handle:
            header = [name.split(":")[0] for name in handle.readline().rstrip("\n").split("\t")]
            missing = [name for name in (user_field, item_field, candidates_field) if name not in header]
            if missing:
                raise RecboleMMError(f"{path}:1: header {header} lacks the column(s) {missing}; expected "
                                     f"{user_field}, {item_field} (the target) and {candidates_field}.")
            user_col, item_col, cand_col = (header.index(n) for n in (user_field, item_field, candidates_field))
            for line_number, line in enumerate(handle, 2):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != len(header):
                    raise RecboleMMError(f"{path}:{line_number}: {len(parts)} fields, the header has {len(header)}.")
                key = (parts[user_col], parts[item_col])
                candidates = list(dict.fromkeys(parts[cand_col].split()))
                if key[1] not in candidates:
                    raise RecboleMMError(f"{path}:{line_number}: the target {key[1]!r} is not among its candidates; "
                                         "a candidate set must contain the item it is evaluated on.")
                if key in sets:
                    raise RecboleMMError(f"{path}:{line_number}: a second set for user {key[0]!r}, target "
                                         f"{key[1]!r}; each (user, target) needs exactly one.")
                sets[key] = candidates
        if not sets:
            raise RecboleMMError(f"{path}: no candidate set in the file.")
        return cls(sets, path)

    def bind(self, dataset):
        """Translate the tokens to the dataset's internal ids (once); unknown tokens are an error."""
        if self._internal is not None:
            return self
        user_ids = dataset.field2token_id[dataset.uid_field]
        item_ids = dataset.field2token_id[dataset.iid_field]
        unknown = sorted({t for (_, target), cands in self.sets.items() for t in cands + [target] if t not in item_ids})
        unknown_users = sorted({user for user, _ in self.sets if user not in user_ids})
        if unknown or unknown_users:
            raise RecboleMMError(
                f"{self.path}: {len(unknown)} item token(s) (first: {unknown[:5]}) and {len(unknown_users)} user "
                f"token(s) (first: {unknown_users[:5]}) are not in dataset '{dataset.dataset_name}'; the file "
                "belongs to another conversion of the data: re-run the converter."
            )
        self._internal = {
            (user_ids[user], item_ids[target]): [item_ids[t] for t in cands] for (user, target), cands in self.sets.items()
        }
        self._tokens = (dataset.field2id_token[dataset.uid_field], dataset.field2id_token[dataset.iid_field])
        return self

    def evaluation_candidates(self, users: torch.Tensor, histories: torch.Tensor, targets: torch.Tensor):
        """(B, m) candidate ids (short sets padded with the target) and (B,) target slots."""
        if self._internal is None:
            raise RecboleMMError("FileCandidateSets.bind(dataset) must be called before evaluation.")
        rows = []
        for user, target in zip(users.tolist(), targets.tolist()):
            candidates = self._internal.get((user, target))
            if candidates is None:
                user_tokens, item_tokens = self._tokens
                raise RecboleMMError(
                    f"{self.path}: no candidate set for user {user_tokens[user]!r} with target "
                    f"{item_tokens[target]!r}; the file must cover every evaluated (user, target) pair."
                )
            rows.append(candidates)
        width = max(len(row) for row in rows)
        padded = [row + [target] * (width - len(row)) for row, target in zip(rows, targets.tolist())]
        labels = [row.index(target) for row, target in zip(rows, targets.tolist())]
        device = targets.device
        return torch.tensor(padded, dtype=torch.long, device=device), torch.tensor(labels, dtype=torch.long, device=device)


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
