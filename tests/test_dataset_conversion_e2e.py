"""End to end: ml-100k slice -> atomic files + real MiniLM features -> 1-epoch MMSASRec through
recbole_mm.quick_start.run, using properties/dataset/ml-100k-mm.yaml as shipped (the text encoder is part
of the core install)."""
import numpy as np

from dataset_conversion import movielens
from dataset_conversion.encode_features import encode_text_modality, load_text_encoder


def test_converted_ml_100k_slice_trains_mmsasrec(in_tmp_cwd):
    from recbole_mm.quick_start import build, run

    data_root = in_tmp_cwd / "data"
    dataset_dir, dataset, stats = movielens.convert("ml-100k", output_dir=data_root, max_users=25)
    encoder = load_text_encoder(device="cpu")
    for modality, field in (("text", "title"), ("genre", "genre")):
        encode_text_modality(dataset_dir, dataset, modality, field, encoder, show_progress=False)

    config_dict = {
        "data_path": str(data_root), "modalities": ["text", "genre"], "epochs": 1, "train_batch_size": 256,
        "eval_batch_size": 256, "show_progress": False, "checkpoint_dir": str(in_tmp_cwd / "saved"),
        "n_layers": 1, "hidden_size": 32, "inner_size": 64, "MAX_ITEM_LIST_LENGTH": 20,
    }
    assert dataset == "ml-100k-mm-25users"  # a slice never takes the full conversion's name
    yaml_files = [str(dataset_dir / f"{dataset}.yaml")]
    config, (train_data, _, _), model, _ = build("MMSASRec", dataset, yaml_files, config_dict=config_dict)
    assert config["TIME_FIELD"] == "timestamp" and train_data.dataset.has_timestamps
    # the hook put title features of each RecBole item id at that id's row (row 0 = padding)
    hook_table = model.feature_table("text").cpu().numpy()
    file_table = np.load(dataset_dir / f"{dataset}.text.npy")
    rows = dict(line.split("\t") for line in (dataset_dir / f"{dataset}.item2index").read_text().splitlines())
    tokens = train_data.dataset.field2id_token["item_id"]
    assert not hook_table[0].any()
    for internal_id in range(1, len(tokens)):
        np.testing.assert_array_equal(hook_table[internal_id], file_table[int(rows[tokens[internal_id]])])
    assert model.feature_dims == {"text": 384, "genre": 384}

    result = run("MMSASRec", dataset, yaml_files, config_dict=config_dict)
    assert result["dataset"] == "ml-100k-mm-25users"
    assert np.isfinite(result["test_result"]["ndcg@10"]) and 0.0 <= result["test_result"]["recall@10"] <= 1.0
