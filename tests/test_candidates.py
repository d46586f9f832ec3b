"""Candidate sets, PPT prompts and the candidate-protocol metrics against brute-force definitions."""

import numpy as np
import pytest
import torch
from recbole.evaluator.collector import DataStruct

from recbole_mm.data.candidates import (
    CandidateSampler,
    position_proxy_batch,
    position_proxy_example,
    restrict_scores_to_candidates,
)
from recbole_mm.evaluator import HR, VHR, ValidRatio


def random_histories(n_rows=64, n_items=30, max_len=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    histories = torch.zeros(n_rows, max_len, dtype=torch.long)
    for row in range(n_rows):
        length = int(torch.randint(1, max_len + 1, (1,), generator=g))
        histories[row, :length] = torch.randint(1, n_items, (length,), generator=g)
    targets = torch.randint(1, n_items, (n_rows,), generator=g)
    users = torch.arange(100, 100 + n_rows)
    return users, histories, targets


def check_sets(histories, targets, candidates, labels, m):
    assert candidates.shape == (len(targets), m)
    for history, target, row, label in zip(histories.tolist(), targets.tolist(), candidates.tolist(), labels.tolist()):
        assert row.count(target) == 1 and row[label] == target
        assert len(set(row)) == m and 0 not in row
        assert not (set(row) - {target}) & set(history)


@pytest.mark.parametrize("m", [2, 5, 8])
def test_candidate_sets_exclude_history_and_hold_target_once(m):
    users, histories, targets = random_histories()
    sampler = CandidateSampler(n_items=30, num_candidates=m, seed=3)
    check_sets(histories, targets, *sampler.training_candidates(histories, targets), m)
    check_sets(histories, targets, *sampler.evaluation_candidates(users, histories, targets), m)


def test_evaluation_candidates_fixed_by_seed_across_runs_and_batching():
    users, histories, targets = random_histories()
    first = CandidateSampler(30, 5, seed=7).evaluation_candidates(users, histories, targets)
    other = CandidateSampler(30, 5, seed=7)
    other.training_candidates(histories, targets)  # training draws must not shift evaluation sets
    order = torch.randperm(len(users), generator=torch.Generator().manual_seed(1))
    halves = [order[:20], order[20:]]
    second = [other.evaluation_candidates(users[i], histories[i], targets[i]) for i in halves]
    candidates = torch.empty_like(first[0])
    labels = torch.empty_like(first[1])
    for index, (c, l) in zip(halves, second):
        candidates[index], labels[index] = c, l
    assert torch.equal(candidates, first[0]) and torch.equal(labels, first[1])
    changed = CandidateSampler(30, 5, seed=8).evaluation_candidates(users, histories, targets)
    assert not torch.equal(changed[0], first[0])


def test_training_candidates_resample_and_target_slot_is_uniform():
    users, histories, targets = random_histories(n_rows=400, n_items=200)
    sampler = CandidateSampler(200, 5, seed=0)
    a = sampler.training_candidates(histories, targets)
    b = sampler.training_candidates(histories, targets)
    assert not torch.equal(a[0], b[0])
    counts = torch.bincount(a[1], minlength=5)
    assert counts.min() > 40  # 400 rows over 5 slots


def test_too_small_catalogue_is_a_clear_error():
    sampler = CandidateSampler(n_items=5, num_candidates=5)
    with pytest.raises(ValueError, match="num_candidates"):
        sampler.training_candidates(torch.tensor([[1, 2, 0]]), torch.tensor([3]))


def brute_force_ppt_label(history, triple):
    positions = []
    for item in triple:
        positions.append(max(j for j, h in enumerate(history) if h == item))
    a, b, c = positions
    return abs(a - b) <= abs(b - c)


def test_ppt_labels_against_brute_force():
    rng = np.random.default_rng(0)
    _, histories, _ = random_histories(n_rows=300, n_items=8, max_len=10, seed=5)
    seen_labels = set()
    for history in histories.tolist():
        real = [h for h in history if h]
        example = position_proxy_example(history, rng)
        if len(set(real)) < 3:
            assert example is None
            continue
        triple, label = example
        assert len(set(triple)) == 3 and set(triple) <= set(real)
        assert label == brute_force_ppt_label(real, triple)
        seen_labels.add(label)
    assert seen_labels == {True, False}


def test_ppt_batch_skips_short_rows():
    histories = torch.tensor([[1, 2, 0, 0], [1, 1, 2, 2], [4, 5, 6, 0], [3, 4, 3, 5]])
    rows, triples, labels = position_proxy_batch(histories, np.random.default_rng(0))
    assert rows.tolist() == [2, 3]
    for row, triple, label in zip(rows.tolist(), triples.tolist(), labels.tolist()):
        real = [h for h in histories[row].tolist() if h]
        assert label == brute_force_ppt_label(real, triple)


def test_restrict_scores_to_candidates():
    scores = torch.randn(3, 10)
    candidates = torch.tensor([[1, 4, 5], [2, 3, 9], [8, 7, 6]])
    restricted = restrict_scores_to_candidates(scores, candidates)
    for row in range(3):
        for item in range(10):
            expected = scores[row, item] if item in candidates[row].tolist() else float("-inf")
            assert restricted[row, item] == expected


def collect(scores, targets, topk=1):
    """What RecBole's Collector stores for the candidate metrics (rec.topk, rec.score)."""
    _, top = torch.topk(scores, topk, dim=-1)
    pos = torch.zeros_like(scores, dtype=torch.int)
    pos[torch.arange(len(targets)), targets] = 1
    data = DataStruct()
    data.set("rec.topk", torch.cat([pos.gather(1, top), pos.sum(1, keepdim=True)], dim=1))
    data.set("rec.score", scores)
    return data


def test_candidate_metrics_against_hand_count():
    inf = float("-inf")
    scores = torch.full((5, 6), inf)
    scores[0, [1, 2]] = torch.tensor([3.0, 1.0])  # valid, hit (target 1)
    scores[1, [1, 2]] = torch.tensor([0.0, 1.0])  # valid, miss
    scores[2, 3] = 0.0  # valid, hit (one-hot generated answer)
    # rows 3, 4: invalid answers (no finite score); row 3's target would be top-1 of a tie of -inf
    targets = torch.tensor([1, 1, 3, 0, 4])
    config = {"metric_decimal_place": 4, "topk": [1]}
    data = collect(scores, targets)
    assert ValidRatio(config).calculate_metric(data) == {"validratio": 0.6}
    assert HR(config).calculate_metric(data) == {"hr@1": round(2 / 3, 4)}
    assert VHR(config).calculate_metric(data) == {"vhr@1": 0.4}


def test_hr_at_1_divides_by_the_valid_rows_even_when_one_or_none_is_valid():
    config = {"metric_decimal_place": 4, "topk": [1]}
    inf = float("-inf")
    scores = torch.full((3, 4), inf)
    scores[0, [1, 2]] = torch.tensor([2.0, 1.0])  # the one valid row, a hit
    data = collect(scores, torch.tensor([1, 0, 0]))
    assert HR(config).calculate_metric(data) == {"hr@1": 1.0}
    assert ValidRatio(config).calculate_metric(data) == {"validratio": round(1 / 3, 4)}
    assert VHR(config).calculate_metric(data) == {"vhr@1": round(1 / 3, 4)}
    nothing_valid = collect(torch.full((2, 4), inf), torch.tensor([0, 1]))
    assert HR(config).calculate_metric(nothing_valid) == {"hr@1": 0.0}


def test_candidate_metrics_are_registered_in_recbole_tables_by_lower_case_name(monkeypatch):
    """RecBole's Config check and Evaluator look metrics up by lower-case name in these module dicts.
    The tables start without them (import already registered them once)."""
    from recbole.evaluator import register as recbole_register

    from recbole_mm.evaluator.candidate_metrics import HR, VHR, ValidRatio, register_candidate_metrics

    ours = {"hr", "validratio", "vhr"}
    for table in ("metrics_dict", "metric_information", "metric_types"):
        kept = {key: value for key, value in getattr(recbole_register, table).items() if key not in ours}
        monkeypatch.setattr(recbole_register, table, kept)
    register_candidate_metrics()
    for name, metric in (("hr", HR), ("validratio", ValidRatio), ("vhr", VHR)):
        assert recbole_register.metrics_dict[name] is metric
        assert recbole_register.metric_information[name] == metric.metric_need
        assert recbole_register.metric_types[name] == metric.metric_type
