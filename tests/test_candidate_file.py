"""File-backed candidate sets (CandidateFile) and the candidate-protocol trainer evaluating exactly the
samples a file covers, against sets and metrics built by hand."""

import numpy as np
import pytest
import torch

from recbole_mm.data.candidates import CandidateFile
from recbole_mm.utils import RecboleMMError

USERS = {"[PAD]": 0, "u1": 1, "u2": 2, "u3": 3}
ITEMS = {"[PAD]": 0, **{f"i{n}": n for n in range(1, 21)}}


def write(tmp_path, text, name="toy.random"):
    path = tmp_path / name
    path.write_text(text)
    return path


def expected_set(listed, target, size, seed, user, length):
    """LLMRank's rule written out: drop the target from the list, keep the first size-1, insert the target."""
    negatives = [item for item in listed if item != target][: size - 1]
    slot = int(np.random.default_rng([seed, user, target, length]).integers(0, size))
    return negatives[:slot] + [target] + negatives[slot:], slot


def test_per_user_sets_follow_the_file_and_drop_the_target(tmp_path):
    path = write(tmp_path, "u1\ti5 i6 i7 i8 i9\nu2\ti3 i4 i5 i6 i7\n")
    source = CandidateFile(path, USERS, ITEMS, num_candidates=4, seed=11)
    users = torch.tensor([1, 2, 1])
    histories = torch.tensor([[1, 2, 0], [1, 0, 0], [2, 3, 4]])
    targets = torch.tensor([7, 10, 5])  # row 0 and row 2: the target is in the file's list
    candidates, labels = source.evaluation_candidates(users, histories, targets)
    listed = {1: [5, 6, 7, 8, 9], 2: [3, 4, 5, 6, 7]}
    for row, (user, target, length) in enumerate(zip([1, 2, 1], [7, 10, 5], [2, 1, 3])):
        expected, slot = expected_set(listed[user], target, 4, 11, user, length)
        assert candidates[row].tolist() == expected and labels[row] == slot
    # every batch order gives the same sets
    again, _ = source.evaluation_candidates(users.flip(0), histories.flip(0), targets.flip(0))
    assert torch.equal(again.flip(0), candidates)
    assert source.covers(torch.tensor([1, 3]), torch.tensor([4, 4])).tolist() == [True, False]


def test_whole_line_when_num_candidates_is_not_set(tmp_path):
    source = CandidateFile(write(tmp_path, "u1\ti5 i6 i7\n"), USERS, ITEMS, num_candidates=None)
    candidates, labels = source.evaluation_candidates(torch.tensor([1]), torch.tensor([[1, 0]]), torch.tensor([2]))
    assert sorted(candidates[0].tolist()) == [2, 5, 6, 7] and candidates[0, labels[0]] == 2


def test_per_sample_lines_key_on_user_and_target(tmp_path):
    path = write(tmp_path, "u1\ti2\ti5 i6 i7\nu1\ti3\ti8 i9 i10\n")
    source = CandidateFile(path, USERS, ITEMS, num_candidates=3)
    candidates, _ = source.evaluation_candidates(torch.tensor([1, 1]), torch.tensor([[1], [2]]), torch.tensor([2, 3]))
    assert set(candidates[0].tolist()) == {2, 5, 6} and set(candidates[1].tolist()) == {3, 8, 9}
    assert source.covers(torch.tensor([1]), torch.tensor([4])).tolist() == [False]
    with pytest.raises(RecboleMMError, match="no candidates for internal user id 1 and target 4"):
        source.evaluation_candidates(torch.tensor([1]), torch.tensor([[1]]), torch.tensor([4]))


@pytest.mark.parametrize("text, message", [
    ("u1\ti5 i6\nnobody\ti5 i6\n", r"users unknown to the dataset: 1 \(first: toy.random:2 \(nobody\)\)"),
    ("u1\ti5 i99 i98\n", r"items unknown to the dataset: 1 \(first: toy.random:1 \(i99, 2 in the line\)\)"),
    ("u1\ti5 i6 i5\n", r"lines listing an item twice: 1 \(first: toy.random:1\)"),
    ("u1\ti5 i6\nu2\ti5\nu1\ti7 i8\n", r"on more than one line: 1 \(first: toy.random:3\)"),
    ("u1 i5 i6\n", r"malformed lines .*toy.random:1"),
    ("u1\ti5 i6\nu2\ti3\ti5 i6\n", "a mix of 2- and 3-field lines"),
    ("u1\ti9\ti5 i6\nu2\ti99\ti5\n", r"items unknown to the dataset: 1 \(first: toy.random:2 \(target i99\)\)"),
    ("\n", "no candidate line"),
])
def test_bad_candidate_files_are_errors_naming_file_and_line(tmp_path, text, message):
    with pytest.raises(RecboleMMError, match=message):
        CandidateFile(write(tmp_path, text), USERS, ITEMS, num_candidates=3)


def test_too_few_candidates_and_missing_file(tmp_path):
    source = CandidateFile(write(tmp_path, "u1\ti5 i6\n"), USERS, ITEMS, num_candidates=4)
    with pytest.raises(RecboleMMError, match="fewer than num_candidates - 1 = 3"):
        source.evaluation_candidates(torch.tensor([1]), torch.tensor([[1]]), torch.tensor([2]))
    with pytest.raises(RecboleMMError, match="does not exist"):
        CandidateFile(tmp_path / "absent.random", USERS, ITEMS)


def test_protocol_trainer_evaluates_only_covered_users_on_the_file_sets(tmp_path, in_tmp_cwd):
    """SASRec through quick_start.build with candidate_file: HR@1 / NDCG@5 equal a hand count over the file's users."""
    from recbole.data.interaction import Interaction

    from recbole_mm.quick_start import build
    from tests.conftest import write_timestamped_dataset

    root = tmp_path / "data"
    target_dir, tokens, _, _ = write_timestamped_dataset(root, name="CandToy", n_users=40, n_items=30)
    lines = (target_dir / "CandToy.inter").read_text().splitlines()[1:]
    items_of = {}
    for line in lines:
        user, item, _ = line.split("\t")
        items_of.setdefault(user, []).append(item)
    rng = np.random.default_rng(0)
    covered = [f"U{n}" for n in range(0, 40, 3)]
    with open(target_dir / "CandToy.cands", "w") as handle:
        for user in covered:
            outside = [t for t in tokens if t not in items_of[user]]
            handle.write(f"{user}\t{' '.join(rng.choice(outside, size=12, replace=False))}\n")
    config, (_, _, test_data), model, trainer = build("SASRec", "CandToy", config_dict={
        "data_path": str(root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "TIME_FIELD": "timestamp",
        "epochs": 1, "show_progress": False, "hidden_size": 8, "inner_size": 16,
        "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10, "candidate_protocol": True,
        "candidate_file": "CandToy.cands", "num_candidates": 8, "metrics": ["Hit", "NDCG"], "topk": [1, 5],
        "valid_metric": "NDCG@5", "eval_batch_size": 7,  # batches with and without covered users
    })
    result = trainer.evaluate(test_data, load_best_model=False)

    dataset = test_data._dataset
    file_lists = {}
    for line in (target_dir / "CandToy.cands").read_text().splitlines():
        user, listed = line.split("\t")
        file_lists[dataset.field2token_id["user_id"][user]] = [dataset.field2token_id["item_id"][t] for t in listed.split()]
    hits, gains, n = 0, 0.0, 0
    model.eval()
    for row in range(len(dataset)):
        sample = dataset[np.array([row])]
        user, target = int(sample["user_id"]), int(sample["item_id"])
        if user not in file_lists:
            continue
        with torch.no_grad():
            scores = model.full_sort_predict(Interaction(sample.interaction))[0]
        negatives = [item for item in file_lists[user] if item != target][:7]
        rank = sum(float(scores[item]) > float(scores[target]) for item in negatives)
        hits += rank == 0
        gains += 1 / np.log2(rank + 2) if rank < 5 else 0.0
        n += 1
    assert n == len(covered)
    assert result["hit@1"] == pytest.approx(hits / n, abs=1e-4)
    assert result["ndcg@5"] == pytest.approx(gains / n, abs=1e-4)
