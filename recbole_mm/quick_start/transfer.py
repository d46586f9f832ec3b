"""Pre-train on several datasets at once, then fine-tune on a target dataset from the checkpoint.

MMM4Rec's transfer recipe (paper §IV; design file §10):

- ``pretrain``: one model per source dataset, all sharing every domain-agnostic module (adapters,
  norms, SSD layers) by object identity; each keeps its own frozen feature tables and its own
  domain-specific tensors (item modality bias). Batches of the datasets are interleaved at random,
  each trained with in-batch cross-entropy (``in_batch_loss: True``), NAdam with weight decay. The
  checkpoint holds the shared weights only, in the MMTrainer format (``weights_only=True`` loadable).
  The authors instead merge the sources into one dataset (one item-id space); per-domain models
  give the same shared weights without rewriting data files.
- ``load_pretrained``: loads such a checkpoint (or a normal training checkpoint) non-strictly,
  dropping the model's ``domain_specific_prefixes`` tensors (feature tables are non-persistent
  buffers and never stored); layers the target model lacks (2-layer pre-train -> 1-layer fine-tune)
  are reported and ignored.

Both are reachable from the CLI: ``--pretrain_datasets="[A,B]"`` pre-trains on A and B and then
fine-tunes on ``--dataset`` from the new checkpoint; ``--pretrained=path`` fine-tunes from a file.
Pre-training settings come from the model yaml's ``pretrain_config`` dict (applied on top of the
usual configuration of every source dataset; command-line ``--key=value`` still wins).
"""
import random
import time
from logging import getLogger
from pathlib import Path

import torch
from recbole.data import data_preparation
from recbole.utils import init_seed, set_color

from recbole_mm.compat import load_checkpoint, plain_config
from recbole_mm.config import Config
from recbole_mm.data.utils import create_dataset
from recbole_mm.utils import RecboleMMError, get_model


def parse_dataset_list(value):
    """``[A, B]`` / ``A,B`` / a list -> ['A', 'B'] (the command line delivers the list as text)."""
    if isinstance(value, (list, tuple)):
        names = [str(name).strip() for name in value]
    else:
        names = [name.strip().strip("'\"") for name in str(value).strip().strip("[]").split(",")]
    names = [name for name in names if name]
    if not names:
        raise RecboleMMError(f"pretrain_datasets: no dataset names in {value!r}; use --pretrain_datasets=\"[A,B]\".")
    return names


def domain_specific_keys(model, state_dict):
    """Keys of ``state_dict`` that belong to one dataset's item ids (``model.domain_specific_prefixes``)."""
    prefixes = tuple(getattr(model, "domain_specific_prefixes", ()))
    return sorted(key for key in state_dict if prefixes and key.startswith(prefixes))


def load_pretrained(model, checkpoint_path):
    """Load shared weights from ``checkpoint_path`` into ``model``; return what was loaded and dropped.

    Returns a dict: ``loaded`` (keys taken), ``dropped_domain_specific`` (the checkpoint's
    dataset-bound tensors), ``unexpected`` (checkpoint keys the model lacks, e.g. extra layers),
    ``missing`` (model keys left at their initialisation, e.g. the target's own item bias).
    """
    logger = getLogger()
    checkpoint = load_checkpoint(checkpoint_path)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    saved_model = checkpoint.get("config", {}).get("model") if isinstance(checkpoint, dict) else None
    if saved_model is not None and saved_model != type(model).__name__:
        raise RecboleMMError(
            f"Pre-trained checkpoint {checkpoint_path} was written by model '{saved_model}', not "
            f"'{type(model).__name__}'. Pass --model={saved_model} or another --pretrained file."
        )
    dropped = domain_specific_keys(model, state_dict)
    kept = {key: value for key, value in state_dict.items() if key not in set(dropped)}
    own = model.state_dict()
    for key, value in kept.items():
        if key in own and own[key].shape != value.shape:
            raise RecboleMMError(
                f"Pre-trained checkpoint {checkpoint_path}: '{key}' has shape {tuple(value.shape)}, the model "
                f"expects {tuple(own[key].shape)}. Fine-tune with the pre-training's architecture settings "
                "(hidden_size, expand, head_dim, d_state, n_groups, MAX_ITEM_LIST_LENGTH, feature dims)."
            )
    result = model.load_state_dict(kept, strict=False)
    report = {
        "loaded": sorted(set(kept) - set(result.unexpected_keys)),
        "dropped_domain_specific": dropped,
        "unexpected": sorted(result.unexpected_keys),
        "missing": sorted(result.missing_keys),
    }
    logger.info(
        set_color("pre-trained weights", "green") + f" from {checkpoint_path}: {len(report['loaded'])} tensors loaded, "
        f"{len(dropped)} domain-specific dropped {dropped}, {len(report['unexpected'])} not in this model "
        f"(e.g. extra layers), {len(report['missing'])} left at initialisation {report['missing']}"
    )
    return report


def tie_shared_modules(source, target):
    """Make ``target`` use ``source``'s domain-agnostic submodules (same objects, same parameters)."""
    prefixes = tuple(getattr(source, "domain_specific_prefixes", ()))
    for name, child in source.named_children():
        if not any(prefix.startswith(name + ".") for prefix in prefixes):
            setattr(target, name, child)


def pretrain(model_name, dataset_names, config_file_list=None, config_dict=None, cmd_args=()):
    """Pre-train ``model_name`` on all ``dataset_names`` at once; return the checkpoint path."""
    logger = getLogger()
    config_dict = dict(config_dict or {})
    configs, train_loaders, models = [], [], []
    for index, name in enumerate(dataset_names):
        base = Config(model_name, name, config_file_list, config_dict, cmd_args)
        stage = {**config_dict, **(base["pretrain_config"] or {})}
        config = Config(model_name, name, config_file_list, stage, cmd_args)
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        train_data, _, _ = data_preparation(config, dataset)
        model = get_model(config["model"])(config, train_data.dataset).to(config["device"])
        if models:
            first = models[0]
            if model.feature_dims != first.feature_dims or getattr(model, "is_time", None) != first.is_time:
                raise RecboleMMError(
                    f"pretrain: dataset '{name}' gives feature dims {model.feature_dims} / time path "
                    f"{getattr(model, 'is_time', None)}, but '{dataset_names[0]}' gives {first.feature_dims} / "
                    f"{first.is_time}. Pre-train only on datasets encoded by the same feature encoders and with "
                    "timestamps in all or none of them (or set is_time: False)."
                )
            tie_shared_modules(first, model)
        configs.append(config)
        train_loaders.append(train_data)
        models.append(model)
        logger.info(f"pretrain source {index}: {name}, {len(train_data.dataset)} training sequences")

    config = configs[0]
    parameters = list({id(p): p for m in models for p in m.parameters() if p.requires_grad}.values())
    optimizer = torch.optim.NAdam(parameters, lr=config["learning_rate"], weight_decay=config["weight_decay"])
    rng = random.Random(config["seed"])
    for epoch in range(config["epochs"]):
        start, total_loss, steps = time.time(), 0.0, 0
        for model in models:
            model.train()
        iterators = [iter(loader) for loader in train_loaders]
        schedule = [index for index, loader in enumerate(train_loaders) for _ in range(len(loader))]
        rng.shuffle(schedule)
        for index in schedule:
            interaction = next(iterators[index]).to(config["device"])
            optimizer.zero_grad()
            loss = models[index].calculate_loss(interaction)
            loss.backward()
            if config["clip_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(parameters, **config["clip_grad_norm"])
            optimizer.step()
            total_loss, steps = total_loss + loss.item(), steps + 1
        logger.info(f"pretrain epoch {epoch} [time: {time.time() - start:.2f}s, in-batch loss: {total_loss / max(steps, 1):.4f}]")

    checkpoint_dir = Path(config["checkpoint_dir"])
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / f"{model_name}-pretrain-{'+'.join(dataset_names)}-{time.strftime('%b-%d-%Y_%H-%M-%S')}.pth"
    shared_state = {key: value for key, value in models[0].state_dict().items()
                    if key not in set(domain_specific_keys(models[0], models[0].state_dict()))}
    plain = plain_config(config)
    plain["pretrain_datasets"] = list(dataset_names)
    torch.save({"config": plain, "epoch": config["epochs"] - 1, "state_dict": shared_state}, path)
    logger.info(set_color("pre-trained checkpoint", "blue") + f": {path}")
    return str(path)
