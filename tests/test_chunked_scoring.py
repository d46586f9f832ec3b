"""Full-sort scoring in item chunks (``full_sort_item_chunk``) equals scoring the catalogue at once."""
import pytest
import torch

from tests.conftest import PROJECT_ROOT, scientific_slice_config, write_scientific_slice
from recbole_mm.quick_start import build

SMALL = {
    "MMM4Rec": dict(hidden_size=16, inner_size=32, d_state=8, head_dim=8, n_groups=2, chunk_size=4),
    "FMRLRec": dict(hidden_size=16, mrl_sizes=[8, 16]),
    "MMSASRec": dict(hidden_size=16, inner_size=32),
}


@pytest.mark.parametrize("model_name", sorted(SMALL))
def test_chunked_full_sort_scores_equal_unchunked(model_name, scientific_dir, in_tmp_cwd):
    root = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, root, n_users=40)
    config = scientific_slice_config(root, modalities=["text", "image"], show_progress=False, eval_batch_size=64,
                                     **SMALL[model_name])
    _, (_, _, test_data), model, _ = build(model_name, "SciSlice", config_dict=config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the near-uniform initial scores
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=gen).to(parameter.device))
    model.eval()
    interaction = next(iter(test_data))[0].to(model.device)
    with torch.no_grad():
        model.full_sort_item_chunk = 0
        whole = model.full_sort_predict(interaction)
        model.full_sort_item_chunk = 97  # does not divide n_items: a short last chunk
        assert model.n_items % 97 and model.n_items > 97
        chunked = model.full_sort_predict(interaction)
    assert chunked.shape == whole.shape == (len(interaction), model.n_items)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert whole.std() > 1e-3  # the scores are not trivially constant


def test_training_scores_are_not_chunked(scientific_dir, in_tmp_cwd):
    """Under autograd the projection runs once over all items (its backward needs the whole input)."""
    root = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, root, n_users=20)
    config = scientific_slice_config(root, modalities=["text", "image"], full_sort_item_chunk=50, **SMALL["FMRLRec"])
    _, _, model, _ = build("FMRLRec", "SciSlice", config_dict=config)
    calls = []
    model.feature_projection.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    model.item_table()
    with torch.no_grad():
        model.item_table()
    assert calls[0] == model.n_items and calls[1:] == [min(50, model.n_items - s) for s in range(0, model.n_items, 50)]


def test_catalogue_benchmark_scores_every_item_of_its_synthetic_catalogue(tmp_path):
    """benchmarks/bench_catalogue.py: the .item file puts every item in the catalogue RecBole scores
    (not only the few the users touched), and both chunk settings report a row."""
    import sys

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from bench_catalogue import run_isolated, write_dataset

    data_config = write_dataset(tmp_path, n_items=700, dim=8, n_users=20)
    rows = [run_isolated("MMSASRec", chunk, data_config, batches=1) for chunk in (128, 0)]
    assert [row["status"] for row in rows] == ["ok", "ok"], rows
    assert [row["n_items"] for row in rows] == [700, 700] and all(row["users"] == 20 for row in rows)
