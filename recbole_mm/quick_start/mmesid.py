"""MMESID's stages, each cached on its own (paper Alg. 1).

1. ``collab``: train RecBole's SASRec (``collab_model``, ``collab_config``) on the same dataset and
   keep its item table E_c, or read ``mmesid_collab_file``.
2. ``tokenizer``: train the MM-RQ-VAE over E_c and the run's modalities (text, image); keep each
   modality's semantic IDs, codebooks, quantised embeddings, collision and reconstruction stats, or
   read ``mmesid_sid_file``.
3. ``llm``: the ``MMESID`` model, trained and evaluated by quick_start.

``quick_start.run('MMESID', ...)`` runs all three (``prepare_run``). Stage outputs are ``.pt`` files
of plain tensors/lists (``torch.load(weights_only=True)`` loads them) under ``mmesid_cache_dir``
(default ``<checkpoint_dir>/mmesid_cache``), named by a hash of every setting that changes them:
changing a setting recomputes that stage and the ones after it; ``mmesid_force: True`` recomputes.

Command line (extra ``--key=value`` override config as usual):
    python -m recbole_mm.quick_start.mmesid --dataset=Scientific [--stage=collab|tokenizer|all]
"""
import argparse
import hashlib
import json
import sys
from logging import getLogger
from pathlib import Path

import torch

from recbole.utils import init_seed

from recbole_mm.config import Config
from recbole_mm.data.item_tables import COLLAB, load_collaborative_table
from recbole_mm.data.utils import create_dataset
from recbole_mm.model.layers.llm import backbone_hidden_size
from recbole_mm.model.layers.rqvae import (MultimodalRQVAE, collision_statistics, reconstruction_quality,
                                           train_multimodal_rqvae)
from recbole_mm.quick_start.quick_start import build, run
from recbole_mm.utils import RecboleMMError
from recbole_mm.utils.atomic import torch_save_atomic

STAGES = ("collab", "tokenizer", "llm")
# Settings of the MMESID run that the collaborative model's run shares, beside every RecBole
# dataset setting: same data, split, seed, device and evaluation protocol.
SHARED_WITH_COLLAB_RUN = (
    "seed", "reproducibility", "use_gpu", "gpu_id", "checkpoint_dir", "show_progress", "state", "eval_args",
    "metrics", "topk", "valid_metric", "eval_batch_size",
)
RQVAE_KEYS = (
    "rqvae_hidden_dims", "rqvae_levels", "rqvae_codebook_size", "rqvae_recon_loss", "rqvae_align_loss",
    "rqvae_recon_weight", "rqvae_align_weight", "rqvae_rq_weight", "rqvae_commitment", "rqvae_temperature",
    "rqvae_bandwidth_scale", "rqvae_epochs", "rqvae_batch_size", "rqvae_learning_rate", "rqvae_weight_decay",
    "rqvae_kmeans_iters", "rqvae_codebook_init", "rqvae_sinkhorn_epsilons", "rqvae_sinkhorn_iters",
    "rqvae_rq_reduction", "rqvae_commitment_path", "rqvae_reseed_dead_codes",
)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
def _digest(spec):
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def cache_directory(config):
    root = config["mmesid_cache_dir"] or Path(config["checkpoint_dir"]) / "mmesid_cache"
    directory = Path(root) / str(config["dataset"])
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def collaborative_stage(config, cache_dir, logger=None):
    """Stage 1: path of the E_c file (given, cached, or written now by training ``collab_model``)."""
    logger = logger or getLogger()
    if config["mmesid_collab_file"]:
        return Path(config["mmesid_collab_file"])
    keys = [*config.parameters["Dataset"], *SHARED_WITH_COLLAB_RUN]
    shared = {key: _plain(config[key]) for key in keys if key in config and config[key] is not None}
    shared["data_path"] = str(Path(config["data_path"]).parent)  # RecBole appended the dataset name
    collab_config = {**shared, **_plain(dict(config["collab_config"] or {}))}
    # where files go and how much is printed do not change the embeddings
    spec = {"dataset": config["dataset"], "model": config["collab_model"],
            "config": {k: v for k, v in collab_config.items() if k not in ("checkpoint_dir", "show_progress")}}
    path = cache_dir / f"collab-{config['collab_model']}-{_digest(spec)}.pt"
    if path.is_file() and not config["mmesid_force"]:
        logger.info(f"MMESID stage collab: cached {path}")
        return path
    logger.info(f"MMESID stage collab: training {config['collab_model']} for item embeddings -> {path}")
    # only the shared settings and collab_config: the MMESID run's own epochs, learning rate, ... stay out
    collab_run, (train_data, valid_data, test_data), model, trainer = build(
        config["collab_model"], config["dataset"], None, collab_config
    )
    _, valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=collab_run["show_progress"])
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=collab_run["show_progress"])
    if not hasattr(model, "item_embedding"):
        raise RecboleMMError(
            f"collab_model={config['collab_model']} has no item_embedding table; use SASRec (or another "
            "ID-based sequential model), or give mmesid_collab_file."
        )
    dataset = train_data.dataset
    torch_save_atomic({
        "item_tokens": [str(token) for token in dataset.field2id_token[dataset.iid_field]],
        "embedding": model.item_embedding.weight.detach().float().cpu(),
        "model": config["collab_model"],
        "valid_result": {k: float(v) for k, v in dict(valid_result or {}).items()},
        "test_result": {k: float(v) for k, v in dict(test_result).items()},
    }, path)
    logger.info(f"MMESID stage collab: {config['collab_model']} test {dict(test_result)}")
    return path


def rqvae_latent_dim(config):
    """The code vectors must live in the LLM's token space (paper Sec. 3.2): default = LLM hidden size."""
    return int(config["rqvae_latent_dim"] or backbone_hidden_size(config))


def tokenizer_stage(config, cache_dir, collab_path, logger=None):
    """Stage 2: path of the semantic-ID file (given, cached, or written now by the MM-RQ-VAE)."""
    logger = logger or getLogger()
    if config["mmesid_sid_file"]:
        return Path(config["mmesid_sid_file"])
    modalities = list(config["modalities"] or [])
    collab_path = Path(collab_path)
    spec = {
        "dataset": config["dataset"], "data_path": str(config["data_path"]),
        "collab": [collab_path.name, collab_path.stat().st_size, int(collab_path.stat().st_mtime)],
        "modalities": modalities,
        "feature_tables": _plain({name: (config["feature_tables"] or {}).get(name) for name in modalities}),
        "rqvae": {key: _plain(config[key]) for key in RQVAE_KEYS},
        "latent_dim": rqvae_latent_dim(config), "seed": config["seed"],
    }
    path = cache_dir / f"sid-{_digest(spec)}.pt"
    if path.is_file() and not config["mmesid_force"]:
        logger.info(f"MMESID stage tokenizer: cached {path}")
        return path
    dataset = create_dataset(config)
    collab, collab_mask = load_collaborative_table(collab_path, dataset)
    features = {COLLAB: collab, **{name: dataset.item_features[name] for name in modalities}}
    present = {COLLAB: collab_mask, **{name: dataset.item_feature_masks[name].clone() for name in modalities}}
    for mask in present.values():
        mask[0] = False  # the padding item is no item
    init_seed(config["seed"], True)
    model = MultimodalRQVAE(
        {name: table.shape[1] for name, table in features.items()},
        hidden_dims=list(config["rqvae_hidden_dims"]), latent_dim=spec["latent_dim"],
        n_levels=int(config["rqvae_levels"]), codebook_size=int(config["rqvae_codebook_size"]), anchor=COLLAB,
        recon_loss=config["rqvae_recon_loss"], align_loss=config["rqvae_align_loss"],
        recon_weight=float(config["rqvae_recon_weight"]), align_weight=float(config["rqvae_align_weight"]),
        rq_weight=float(config["rqvae_rq_weight"]), commitment_weight=float(config["rqvae_commitment"]),
        temperature=float(config["rqvae_temperature"]), bandwidth_scale=float(config["rqvae_bandwidth_scale"]),
        kmeans_iters=int(config["rqvae_kmeans_iters"]), codebook_init=config["rqvae_codebook_init"],
        sinkhorn_epsilons=list(config["rqvae_sinkhorn_epsilons"]), sinkhorn_iters=int(config["rqvae_sinkhorn_iters"]),
        rq_reduction=config["rqvae_rq_reduction"], commitment_path=config["rqvae_commitment_path"],
    )
    logger.info(f"MMESID stage tokenizer: MM-RQ-VAE over {list(features)} -> {path}")
    history = train_multimodal_rqvae(
        model, features, present, epochs=int(config["rqvae_epochs"]), batch_size=int(config["rqvae_batch_size"]),
        learning_rate=float(config["rqvae_learning_rate"]), weight_decay=float(config["rqvae_weight_decay"]),
        seed=int(config["seed"]), reseed_dead_codes=bool(config["rqvae_reseed_dead_codes"]),
        log=logger.info if config["show_progress"] else None,
    )
    codes, quantized, stats = {}, {}, {}
    for name, table in features.items():
        codes[name], quantized[name], reconstruction = model.encode(name, table)
        rows = present[name]
        stats[name] = {**collision_statistics(codes[name][rows]),
                       **reconstruction_quality(table[rows], reconstruction[rows])}
        logger.info(f"MMESID stage tokenizer: {name}: {stats[name]}")
    every = torch.stack(list(present.values())).all(dim=0)
    stats["joint"] = collision_statistics(torch.cat([codes[name] for name in features], dim=1)[every])
    logger.info(f"MMESID stage tokenizer: all modalities' IDs together: {stats['joint']}")
    torch_save_atomic({
        "item_tokens": [str(token) for token in dataset.field2id_token[dataset.iid_field]],
        "modalities": list(features),
        "codes": codes,
        "codebooks": model.codebooks(),
        "quantized": quantized,
        "stats": stats,
        "history": history,
    }, path)
    return path


def prepare_run(dataset, config_file_list=None, config_dict=None, cmd_args=(), stop_after="llm"):
    """Run (or reuse) stages 1–2 and return ``config_dict`` completed with their files, ready for
    the ``llm`` stage (``quick_start.run('MMESID', ...)`` calls it first)."""
    if stop_after not in STAGES:
        raise RecboleMMError(f"stage {stop_after!r} is not one of {STAGES} (or all).")
    config = Config("MMESID", dataset, config_file_list, config_dict, cmd_args)
    cache_dir = cache_directory(config)
    collab_path = collaborative_stage(config, cache_dir)
    prepared = dict(config_dict or {}, mmesid_collab_file=str(collab_path))
    if stop_after != "collab":
        prepared["mmesid_sid_file"] = str(tokenizer_stage(config, cache_dir, collab_path))
    return prepared


def export_item_tables(dataset, checkpoint, config_file_list=None, config_dict=None, cmd_args=(), path=None):
    """Rebuild a trained MMESID from its checkpoint and save its item matrices (the eq. 16 input
    table, E_x, and each modality's fine-tuned Σ_l E_SID) for ``recbole_mm.tools.embedding_analysis``."""
    _, (train_data, _, _), model, trainer = build("MMESID", dataset, config_file_list, config_dict, cmd_args)
    trainer.load_model_checkpoint(checkpoint)
    model.eval()
    items = train_data.dataset.field2id_token[train_data.dataset.iid_field]
    path = Path(path) if path else Path(checkpoint).with_suffix(".tables.pt")
    torch_save_atomic({
        "item_tokens": [str(token) for token in items],
        "input_table": model.item_input_table().cpu(),
        "target_table": model.target_item_embedding.weight.detach().cpu(),
        "quantized": {name: model.quantized_table(name).cpu() for name in model.channels},
    }, path)
    return path


def run_mmesid(dataset, config_file_list=None, config_dict=None, cmd_args=(), saved=True, export_tables=True):
    """All three stages; returns quick_start's result plus the stage files (and, with
    ``export_tables``, the trained model's item matrices)."""
    prepared = prepare_run(dataset, config_file_list, config_dict, cmd_args)
    result = run("MMESID", dataset, config_file_list, prepared, saved=saved, cmd_args=cmd_args)
    result.update(collab_file=prepared["mmesid_collab_file"], sid_file=prepared["mmesid_sid_file"])
    if export_tables and saved:
        result["tables_file"] = str(
            export_item_tables(dataset, result["checkpoint"], config_file_list, prepared, cmd_args))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="MMESID stages. Other --key=value override config.")
    parser.add_argument("--dataset", "-d", required=True)
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--stage", default="all", choices=[*STAGES, "all"],
                        help="run the stages up to and including this one (default: all)")
    args, overrides = parser.parse_known_args(argv)
    files = args.config_files.split() if args.config_files else None
    try:
        if args.stage in ("llm", "all"):
            result = run_mmesid(args.dataset, files, cmd_args=overrides)
            print(f"[recbole-mm] MMESID test={result['test_result']} checkpoint={result['checkpoint']}")
        else:
            prepared = prepare_run(args.dataset, files, cmd_args=overrides, stop_after=args.stage)
            print(json.dumps({k: v for k, v in prepared.items() if k.startswith("mmesid_")}, indent=1))
    except RecboleMMError as error:
        print(f"recbole-mm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
