"""FileCandidateSets: candidate sets given by a file (recbole_mm.data.candidates)."""
from types import SimpleNamespace

import pytest
import torch

from recbole_mm.data.candidates import FileCandidateSets
from recbole_mm.utils import RecboleMMError


def toy_dataset(users, items):
    """The parts of a RecBole dataset that bind() reads: token <-> internal id maps (0 = padding)."""
    user_tokens, item_tokens = ["[PAD]"] + users, ["[PAD]"] + items
    return SimpleNamespace(
        uid_field="user_id", iid_field="item_id", dataset_name="Toy",
        field2token_id={"user_id": {t: n for n, t in enumerate(user_tokens)},
                        "item_id": {t: n for n, t in enumerate(item_tokens)}},
        field2id_token={"user_id": user_tokens, "item_id": item_tokens})


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sets_are_read_bound_and_padded_with_the_target(tmp_path):
    path = write(tmp_path / "Toy.candidates", [
        "user_id:token\titem_id:token\tcandidates:token_seq\tsplit:token",
        "u1\tb\tb a c a\tvalid", "u1\tc\tc d\ttest", "u2\ta\td a\ttest"])
    sets = FileCandidateSets.read(path).bind(toy_dataset(["u1", "u2"], ["a", "b", "c", "d"]))
    candidates, labels = sets.evaluation_candidates(torch.tensor([1, 2, 1]), torch.zeros(3, 4, dtype=torch.long),
                                                    torch.tensor([2, 1, 3]))
    # a repeated token counts once; shorter sets are padded with their target (no new item enters a set)
    assert candidates.tolist() == [[2, 1, 3], [4, 1, 1], [3, 4, 3]]
    assert labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize("lines, message", [
    (["user_id\ttarget\tcandidates", "u1\ta\ta b"], r"Toy\.candidates:1: header .* lacks the column\(s\) \['item_id'\]"),
    (["user_id\titem_id\tcandidates", "u1\ta\tb c"], r"Toy\.candidates:2: the target 'a' is not among its candidates"),
    (["user_id\titem_id\tcandidates", "u1\ta\ta b", "u1\ta\ta c"], r"Toy\.candidates:3: a second set for user 'u1'"),
    (["user_id\titem_id\tcandidates", "u1\ta"], r"Toy\.candidates:2: 2 fields, the header has 3"),
])
def test_malformed_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(RecboleMMError, match=message):
        FileCandidateSets.read(write(tmp_path / "Toy.candidates", lines))


def test_tokens_of_another_dataset_and_uncovered_rows_are_errors(tmp_path):
    path = write(tmp_path / "Toy.candidates", ["user_id\titem_id\tcandidates", "u1\ta\ta zz"])
    with pytest.raises(RecboleMMError, match=r"1 item token\(s\) \(first: \['zz'\]\) .* re-run the converter"):
        FileCandidateSets.read(path).bind(toy_dataset(["u1"], ["a", "b"]))
    sets = FileCandidateSets.read(write(path, ["user_id\titem_id\tcandidates", "u1\ta\ta b"])).bind(
        toy_dataset(["u1"], ["a", "b"]))
    with pytest.raises(RecboleMMError, match=r"no candidate set for user 'u1' with target 'b'"):
        sets.evaluation_candidates(torch.tensor([1]), torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]))
    with pytest.raises(RecboleMMError, match="does not exist"):
        FileCandidateSets.read(tmp_path / "missing.candidates")
