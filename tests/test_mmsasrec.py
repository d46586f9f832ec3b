"""MMSASRec against direct computations."""
import pytest
import torch

from recbole_mm.quick_start import build
from tests.conftest import scientific_slice_config, write_scientific_slice


@pytest.fixture
def built(scientific_dir, in_tmp_cwd):
    root = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, root)
    config, loaders, model, trainer = build("MMSASRec", "SciSlice", config_dict=scientific_slice_config(root))
    model.eval()
    return config, loaders, model


def test_item_table_is_projection_of_concatenated_features(built):
    _, _, model = built
    features = torch.cat([model.feature_table("text"), model.feature_table("image")], dim=-1)
    expected = features @ model.feature_projection.weight.T + model.feature_projection.bias
    assert torch.allclose(model.item_representations(), expected, atol=1e-6)


def test_predict_agrees_with_full_sort(built):
    _, (train, _, _), model = built
    batch = next(iter(train))
    with torch.no_grad():
        full = model.full_sort_predict(batch)
        pointwise = model.predict(batch)
    assert torch.allclose(full[torch.arange(len(batch)), batch["item_id"]], pointwise, atol=1e-5)


def test_items_after_the_last_position_cannot_change_scores(built):
    """Causal attention + read-out at the last real position: whatever fills the right padding
    (here random real items) cannot reach the user's representation."""
    _, (train, _, _), model = built
    batch = next(iter(train))
    with torch.no_grad():
        before = model.full_sort_predict(batch)
        sequences = batch[model.ITEM_SEQ].clone()
        after_end = torch.arange(sequences.shape[1]).unsqueeze(0) >= batch[model.ITEM_SEQ_LEN].unsqueeze(1)
        sequences[after_end] = torch.randint(1, model.n_items, (int(after_end.sum()),))
        batch[model.ITEM_SEQ] = sequences
        assert torch.allclose(model.full_sort_predict(batch), before, atol=1e-5)


def test_id_only_and_text_only_variants(scientific_dir, in_tmp_cwd):
    root = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, root)
    _, _, text_only, _ = build("MMSASRec", "SciSlice", config_dict=scientific_slice_config(root, modalities=["text"]))
    assert text_only.feature_projection.in_features == 512
    _, _, id_only, _ = build("MMSASRec", "SciSlice",
                             config_dict=scientific_slice_config(root, modalities=[], use_id_embedding=True))
    assert not hasattr(id_only, "feature_projection")
    assert torch.equal(id_only.item_representations(), id_only.item_embedding.weight)
