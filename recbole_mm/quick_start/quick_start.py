"""Train, early-stop and test one model on one dataset, the way RecBole's quick_start does.

RecBole's own ``recbole.quick_start`` imports ray (broken on current stacks) and only finds
RecBole's models; this one finds recbole-mm models first and saves safe checkpoints.
"""
from logging import getLogger
from pathlib import Path

from recbole.data import data_preparation
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_mm.config import DATA_ENV_VAR, Config
from recbole_mm.data.utils import create_dataset
from recbole_mm.evaluator.candidate_protocol import with_candidate_protocol
from recbole_mm.model.mmesid import MMESID
from recbole_mm.quick_start.transfer import load_pretrained, parse_dataset_list, pretrain
from recbole_mm.trainer import MMTrainer
from recbole_mm.trainer.trainer import options_only_mmtrainer_reads
from recbole_mm.utils import RecboleMMError, get_model, get_trainer


# Built on first use from data that ships with the installed packages: the default dataset runs
# right after installation, offline.
EMBEDDED_DATASET = "ml-100k-mm"


def check_dataset_exists(config):
    data_dir = Path(config["data_path"])
    if config["dataset"] == EMBEDDED_DATASET:
        tables = [data_dir / (spec["path"] if isinstance(spec, dict) else spec)
                  for spec in config["feature_tables"].values()]
        if not all(path.is_file() for path in tables):
            from dataset_conversion.movielens import build_bundled_ml_100k

            getLogger().info(f"{EMBEDDED_DATASET}: first use, building it in {data_dir} from the ml-100k copy "
                             "inside RecBole and the offline MiniLM text encoder (about a minute on a CPU)")
            build_bundled_ml_100k(data_dir.parent)
        return
    if data_dir.is_dir():
        return
    raise RecboleMMError(
        f"Dataset '{config['dataset']}' not found: looked in {data_dir} (data_path + dataset name). "
        f"Point --data_path=<folder containing the dataset folder> or ${DATA_ENV_VAR} at it, or create it "
        "with dataset_conversion/ (docs/datasets.md)."
    )


def build(model, dataset, config_file_list=None, config_dict=None, cmd_args=()):
    """Config, data loaders, model and trainer, ready to fit. ``model``: a name or a model class."""
    config = Config(model, dataset, config_file_list, config_dict, cmd_args)
    check_dataset_exists(config)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    if config.keys_for_other_models():
        logger.warning(f"{config['model']} does not read {', '.join(config.keys_for_other_models())} (keys of other "
                       "models, e.g. from a config file shared by several): they have no effect on this run")
    if getattr(config, "history_fields_not_features", None):
        logger.info(f"{config['model']}: {', '.join(config.history_fields_not_features)} loaded to number the items, "
                    "not read as features (full ranking scores users from user and item columns only)")
    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = config.model_class(config, train_data.dataset).to(config["device"])
    logger.info(model)
    load_pretrained_weights(config, model, config_file_list, config_dict, cmd_args)
    trainer_class = get_trainer(config["MODEL_TYPE"], config["model"], config.model_class)
    if config["candidate_protocol"]:
        trainer_class = with_candidate_protocol(trainer_class)
    trainer = trainer_class(config, model)
    unread = [] if isinstance(trainer, MMTrainer) else options_only_mmtrainer_reads(config)
    if unread:
        logger.warning(f"{config['model']} trains with RecBole's own trainer, which does not read {', '.join(unread)} "
                       "(recbole-mm's trainer options for recbole-mm models): they have no effect on this run")
    if config["candidate_protocol"]:
        trainer.prepare_candidate_source(train_data.dataset)
    return config, (train_data, valid_data, test_data), model, trainer


def load_pretrained_weights(config, model, config_file_list, config_dict, cmd_args):
    """Transfer (recbole_mm.quick_start.transfer): ``pretrain_datasets`` pre-trains on those datasets first;
    ``pretrained`` (or the checkpoint just written) is loaded non-strictly into ``model``."""
    if config["pretrain_datasets"]:
        names = parse_dataset_list(config["pretrain_datasets"])
        config["pretrained"] = pretrain(config["model"], names, config_file_list, config_dict, cmd_args)
    if config["pretrained"]:
        load_pretrained(model, config["pretrained"])


def prepare_inputs(model_class, dataset, config_file_list=None, config_dict=None, cmd_args=()):
    """Produce (or reuse from its cache) what a model's earlier stages feed it, and return the
    config_dict to build it with: MMESID's collaborative embeddings and semantic IDs."""
    if not issubclass(model_class, MMESID):
        return config_dict
    # the stages train other models through run(): imported here, where that recursion starts
    from recbole_mm.quick_start.mmesid import prepare_run

    return prepare_run(dataset, config_file_list, config_dict, cmd_args)


def run(model, dataset, config_file_list=None, config_dict=None, saved=True, cmd_args=(),
        on_built=None, callback_fn=None):
    """Train with early stopping on validation, test the best checkpoint; return the results.

    ``cmd_args``: ``--key=value`` strings that override everything else (the CLI passes its own).
    Models fed by earlier stages get those first (``prepare_inputs``). ``on_built(config, model, trainer, dataset)`` runs before training (e.g. to
    instrument the trainer); ``callback_fn(epoch_idx, valid_score)`` is RecBole's per-validation hook.
    """
    model_class = get_model(model) if isinstance(model, str) else model
    config_dict = prepare_inputs(model_class, dataset, config_file_list, config_dict, cmd_args)
    config, (train_data, valid_data, test_data), model, trainer = build(
        model, dataset, config_file_list, config_dict, cmd_args
    )
    if on_built is not None:
        on_built(config, model, trainer, train_data.dataset)
    logger = getLogger()
    if config["resume"]:
        trainer.resume_checkpoint(config["resume"])
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback_fn
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    environment = get_environment(config)
    logger.info("The running environment of this training is as follows:\n" + environment.draw())
    logger.info(set_color("best valid ", "yellow") + f": {dict(best_valid_result or {})}")
    logger.info(set_color("test result", "yellow") + f": {dict(test_result)}")
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "seed": config["seed"],
        "best_valid_score": float(best_valid_score),
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": {key: float(value) for key, value in dict(best_valid_result or {}).items()},
        "test_result": {key: float(value) for key, value in dict(test_result).items()},
        "checkpoint": trainer.saved_model_file if saved else None,
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters_total": sum(p.numel() for p in model.parameters()),
    }
    if getattr(trainer, "results_per_size", None):  # a nested-size model (FMRLRec): every size's metrics
        plain = lambda per_size: {int(size): {k: float(v) for k, v in dict(metrics).items()}  # noqa: E731
                                  for size, metrics in (per_size or {}).items()}
        result["test_result_per_size"] = plain(trainer.results_per_size)
        result["best_valid_result_per_size"] = plain(trainer.best_valid_results_per_size)
        logger.info(set_color("test result per size", "yellow") + ": " + "; ".join(
            f"d={size} {metrics}" for size, metrics in result["test_result_per_size"].items()))
    return result
