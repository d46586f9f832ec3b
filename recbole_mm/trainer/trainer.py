"""RecBole's Trainer with safe checkpoints, more learners, schedules, accumulation and stages."""
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch import optim
from torch.nn.utils.clip_grad import clip_grad_norm_
from tqdm import tqdm

from recbole_mm.compat import from_tensors_only, load_checkpoint, plain_config, tensors_only
from recbole_mm.trainer.distributed import DistributedTrainingMixin
from recbole_mm.utils import RecboleMMError
from recbole_mm.utils.atomic import torch_save_atomic


def resume_file_for(best_model_file):
    """``<checkpoint_dir>/<Model>-<time>.pth`` (the best epoch, RecBole's name) ->
    ``<checkpoint_dir>/<Model>-<time>-last.pth`` (the resume point, rewritten every epoch)."""
    path = Path(best_model_file)
    return str(path.with_name(f"{path.stem}-last{path.suffix or '.pth'}"))


def _random_generators(model, train_data):
    """Every random generator training draws from besides the global ones: RecBole's data loader
    shuffle generator and negative sampler, and generators a model keeps (Speeder's PPT rows, its
    candidate sampler)."""
    owners = {"train_data": train_data, "train_data.sampler": getattr(train_data, "_sampler", None)}
    owners.update({f"model.{name}" if name else "model": module for name, module in model.named_modules()})
    generators = {}
    for owner_name, owner in owners.items():
        for attribute, value in getattr(owner, "__dict__", {}).items():
            if isinstance(value, (torch.Generator, np.random.Generator, random.Random)):
                generators[f"{owner_name}.{attribute}"] = value
            elif hasattr(value, "training_rng") and isinstance(value.training_rng, np.random.Generator):
                generators[f"{owner_name}.{attribute}.training_rng"] = value.training_rng
    return generators


def _generator_state(generator):
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    return _plain_python_state(generator.getstate())


def _set_generator_state(generator, state):
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    else:
        generator.setstate(_python_state(state))


def _plain_python_state(state):  # random.getstate(): (version, tuple of ints, gauss) -> lists
    return [state[0], list(state[1]), state[2]]


def _python_state(state):
    return (state[0], tuple(state[1]), state[2])


def random_states(model, train_data):
    """Global and per-component random states, as tensors and plain data (weights_only loads them)."""
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *map(int, numpy_state[2:4]),
                  float(numpy_state[4])],
        "python": _plain_python_state(random.getstate()),
        "generators": {name: _generator_state(g) for name, g in _random_generators(model, train_data).items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states, model, train_data):
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(_python_state(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    generators = _random_generators(model, train_data)
    missing = sorted(set(states["generators"]) - set(generators))
    if missing:
        raise RecboleMMError(f"The resume checkpoint holds random generators this run does not have ({missing}): "
                             "it was written by another version of the model. Resume with the same code.")
    for name, state in states["generators"].items():
        _set_generator_state(generators[name], state)


class SafeCheckpointMixin:
    """Checkpoints hold tensors and plain data only, so they load with ``weights_only=True``.

    Two files per run (both written atomically): ``<Model>-<time>.pth``, the best epoch so far
    (RecBole's checkpoint, what evaluation loads), and ``<Model>-<time>-last.pth``, the resume point:
    rewritten at the start of every epoch with everything training depends on (weights, optimizer,
    learning-rate schedule, early-stopping counters, every random state, the epoch and so the
    stage). ``--resume=<...-last.pth>`` continues exactly as if the run had not stopped."""

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        torch_save_atomic(self._checkpoint_state(epoch), saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _checkpoint_state(self, epoch):
        return {
            "config": plain_config(self.config),
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "state_dict": self.model.state_dict(),
            "other_parameter": tensors_only(self.model.other_parameter()),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self._resume_point(train_data, epoch_idx)
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _resume_point(self, train_data, epoch_idx):
        """At the start of an epoch: continue a resumed run's state, else save this resume point."""
        pending = getattr(self, "_pending_resume", None)
        if pending is not None:
            self._pending_resume = None
            if pending["next_epoch"] != epoch_idx:
                raise RecboleMMError(f"The resume checkpoint continues at epoch {pending['next_epoch']}, but "
                                     f"training restarted at epoch {epoch_idx}.")
            if pending.get("stage") != getattr(self, "stage_name", None):
                raise RecboleMMError(f"The resume checkpoint was written in training stage {pending.get('stage')!r}, "
                                     f"but epoch {epoch_idx} is in stage {getattr(self, 'stage_name', None)!r} now: "
                                     "the stage settings changed. Resume with the settings of the run.")
            self.optimizer.load_state_dict(pending["optimizer"])
            if getattr(self, "scheduler", None) is not None and pending.get("scheduler") is not None:
                self.scheduler.load_state_dict(pending["scheduler"])
            self.cur_step, self.best_valid_score = pending["cur_step"], pending["best_valid_score"]
            self.best_valid_result = pending["best_valid_result"]
            set_random_states(pending["random_states"], self.model, train_data)
            return
        if epoch_idx == 0 or (not self.config["single_spec"] and self.config["local_rank"] != 0):
            return
        state = self._checkpoint_state(epoch_idx - 1)
        state["resume"] = {
            "next_epoch": epoch_idx,
            "best_model_file": str(self.saved_model_file),
            "best_valid_result": {k: float(v) for k, v in dict(self.best_valid_result or {}).items()} or None,
            "scheduler": self.scheduler.state_dict() if getattr(self, "scheduler", None) is not None else None,
            "stage": getattr(self, "stage_name", None),
            "random_states": random_states(self.model, train_data),
        }
        torch_save_atomic(state, resume_file_for(self.saved_model_file))

    def load_model_checkpoint(self, checkpoint_file):
        """Load weights from a checkpoint of the same model; return the checkpoint dict."""
        checkpoint = load_checkpoint(checkpoint_file, map_location=self.device)
        saved_model = checkpoint.get("config", {}).get("model")
        if saved_model != self.config["model"]:
            raise RecboleMMError(
                f"Checkpoint {checkpoint_file} was written by model '{saved_model}', not "
                f"'{self.config['model']}'. Pass --model={saved_model} or choose another checkpoint."
            )
        try:
            self.model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            mismatched = [line.strip() for line in str(error).splitlines()[1:] if line.strip()][:3]
            raise RecboleMMError(
                f"Checkpoint {checkpoint_file} holds a {saved_model} of other sizes than this run builds "
                f"({'; '.join(mismatched)} ...). Run with the checkpoint's own settings: the same --config_files "
                f"and --key=value options it was trained with (its config is stored inside it)."
            ) from None
        self.model.load_other_parameter(from_tensors_only(checkpoint.get("other_parameter")))
        return checkpoint

    def resume_checkpoint(self, resume_file):
        """Continue training from ``resume_file``: a ``-last.pth`` resume point continues exactly
        (see the class doc); a best-epoch checkpoint continues from that epoch's weights, optimizer
        and counters (random states and the learning-rate schedule then start afresh)."""
        checkpoint = self.load_model_checkpoint(resume_file)
        resume = checkpoint.get("resume")
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if resume is None:
            self.saved_model_file = str(resume_file)
        else:
            self.saved_model_file = resume["best_model_file"]
            if not Path(self.saved_model_file).is_file() and resume["best_valid_result"]:
                raise RecboleMMError(f"{resume_file} continues a run whose best checkpoint {self.saved_model_file} "
                                     "is gone; restore that file next to it, or train again.")
            self.best_valid_result = resume["best_valid_result"]
            self._pending_resume = {**resume, "optimizer": checkpoint["optimizer"], "cur_step": checkpoint["cur_step"],
                                    "best_valid_score": checkpoint["best_valid_score"]}
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}"
                         + ("" if resume else " (a best-epoch checkpoint: random states start afresh)"))

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            self.load_model_checkpoint(checkpoint_file)
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


@lru_cache(maxsize=None)
def with_safe_checkpoints(trainer_class):
    """RecBole's trainer for a built-in model, with checkpoints torch >= 2.6 loads safely (and DDP
    that also works on CPU, see recbole_mm.trainer.distributed)."""
    return type(trainer_class.__name__, (DistributedTrainingMixin, SafeCheckpointMixin, trainer_class), {})


@dataclass
class TrainingStage:
    """One stage of a multi-stage schedule (pre-train -> fine-tune, curriculum stages, ...).

    ``options`` is free-form data the model's ``enter_stage`` interprets.
    """

    name: str
    epochs: int
    learning_rate: float = None
    options: dict = field(default_factory=dict)


# MMTrainer's options at the values that leave RecBole's training loop as it is; RecBole's built-in models
# train with RecBole's own trainer, which reads none of them.
MMTRAINER_OPTION_DEFAULTS = {
    "gradient_accumulation_steps": 1, "gradient_accumulation_loss": "mean", "train_micro_batch_size": None,
    "optimizer_eps": None, "no_weight_decay_on": [], "lr_scheduler": None, "warmup_steps": 0, "mixed_precision": None,
}


def options_only_mmtrainer_reads(config):
    """The MMTrainer options ``config`` sets away from their defaults."""
    return [key for key, default in MMTRAINER_OPTION_DEFAULTS.items() if (config[key] or default) != default]


def _add_losses(total, values):
    """Running sum of logged losses: a number, or a tuple for models that return several losses."""
    if total is None:
        return values
    return tuple(map(sum, zip(total, values))) if isinstance(values, tuple) else total + values


class MMTrainer(DistributedTrainingMixin, SafeCheckpointMixin, Trainer):
    """Trainer for recbole-mm models. Adds, from config:

    - ``learner``: RecBole's (adam, adamw, sgd, adagrad, rmsprop, sparse_adam) plus ``nadam``;
      an unknown name is an error instead of RecBole's silent fallback to Adam;
    - ``gradient_accumulation_steps``; ``clip_grad_norm`` (RecBole's key);
    - ``train_micro_batch_size``: each batch's forward and backward in pieces of at most this many rows
      (gradients added with row weights: the batch's update, with a fraction of its activation memory);
    - ``lr_scheduler``: ``warmup_cosine`` | ``warmup_linear`` with ``warmup_steps`` (optimizer steps);
    - ``mixed_precision``: ``bf16`` | ``fp16`` autocast of training forward passes on CUDA (fp16 without a
      gradient scaler: prefer bf16);
    - stages: a model with ``training_stages()`` and ``enter_stage(stage)`` is trained stage after
      stage, each with a fresh optimizer over the parameters that stage leaves trainable.
    """

    LEARNERS = {
        "adam": optim.Adam,
        "adamw": optim.AdamW,
        "nadam": optim.NAdam,
        "sgd": optim.SGD,
        "adagrad": optim.Adagrad,
        "rmsprop": optim.RMSprop,
    }

    def __init__(self, config, model):
        # read by _build_optimizer, which RecBole's __init__ calls
        self.optimizer_eps = config["optimizer_eps"]
        self.no_weight_decay_on = list(config["no_weight_decay_on"] or [])
        super().__init__(config, model)
        self.accumulation_steps = max(1, int(config["gradient_accumulation_steps"] or 1))
        self.accumulation_loss = config["gradient_accumulation_loss"] or "mean"
        if self.accumulation_loss not in ("mean", "sum"):
            raise RecboleMMError(
                f"gradient_accumulation_loss: {self.accumulation_loss!r} is not known; use mean (the accumulated "
                "gradient equals one large batch's) or sum (the micro-batch losses added, as MMM4Rec's authors do)."
            )
        self.micro_batch_rows = self._micro_batch_rows(config["train_micro_batch_size"], model)
        self.scheduler_name = config["lr_scheduler"]
        self.warmup_steps = int(config["warmup_steps"] or 0)
        if self.scheduler_name not in (None, "warmup_cosine", "warmup_linear"):
            raise RecboleMMError(
                f"lr_scheduler: {self.scheduler_name!r} is not known; use warmup_cosine, warmup_linear or ~."
            )
        self.scheduler = None
        self.schedule_start_epoch = 0  # the first epoch of the run, or of the current stage
        self.stage_name = None
        self.autocast_dtype = self._autocast_dtype(config["mixed_precision"])

    def _micro_batch_rows(self, micro_batch_size, model):
        """``train_micro_batch_size``: ~ (whole batches) or the most rows one forward/backward takes."""
        if micro_batch_size in (None, 0):
            return None
        if not isinstance(micro_batch_size, int) or isinstance(micro_batch_size, bool) or micro_batch_size < 1:
            raise RecboleMMError(f"train_micro_batch_size: {micro_batch_size!r} must be a positive number of rows "
                                 "or ~ (whole batches).")
        if getattr(model, "loss_couples_batch_rows", False):
            self.logger.warning(f"train_micro_batch_size: {micro_batch_size} is ignored: {type(model).__name__}'s loss "
                                "takes its negatives from the other rows of the batch (in-batch CE), so it trains on "
                                "whole batches.")
            return None
        return micro_batch_size

    def _autocast_dtype(self, mixed_precision):
        """``mixed_precision``: ~ (off) | bf16 | fp16, CUDA only: training forward passes under torch.autocast."""
        if mixed_precision in (None, False, "no", "none"):
            return None
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if mixed_precision not in dtypes:
            raise RecboleMMError(f"mixed_precision: {mixed_precision!r} is not known; use bf16, fp16 or ~.")
        if self.device.type != "cuda":
            raise RecboleMMError(f"mixed_precision: {mixed_precision} needs a CUDA device (this run uses "
                                 f"{self.device}); remove it for CPU runs.")
        return dtypes[mixed_precision]

    def _build_optimizer(self, **kwargs):
        params = kwargs.pop("params", [p for p in self.model.parameters() if p.requires_grad])
        learner = kwargs.pop("learner", self.learner).lower()
        learning_rate = kwargs.pop("learning_rate", self.learning_rate)
        weight_decay = kwargs.pop("weight_decay", self.weight_decay) or 0.0
        if learner == "sparse_adam":
            return super()._build_optimizer(params=params, learner=learner, learning_rate=learning_rate,
                                            weight_decay=weight_decay)
        if learner not in self.LEARNERS:
            raise RecboleMMError(
                f"learner: {learner!r} is not supported; choose one of {sorted(self.LEARNERS) + ['sparse_adam']}."
            )
        extra = {}
        if self.optimizer_eps is not None:
            if learner == "sgd":
                raise RecboleMMError("optimizer_eps: SGD has no epsilon; leave optimizer_eps at ~ or pick an Adam-type learner.")
            extra["eps"] = float(self.optimizer_eps)
        return self.LEARNERS[learner](self._decay_groups(params, weight_decay), lr=learning_rate, **extra)

    def _decay_groups(self, params, weight_decay):
        """Parameter groups: the parameters whose names contain one of ``no_weight_decay_on`` get no
        weight decay (the fMRLRec authors exempt biases and layer norms), the others ``weight_decay``."""
        if not self.no_weight_decay_on:
            return [{"params": list(params), "weight_decay": weight_decay}]
        wanted = {id(param) for param in params}
        exempt, decayed = [], []
        for name, param in self.model.named_parameters():
            if id(param) in wanted:
                (exempt if any(key in name for key in self.no_weight_decay_on) else decayed).append(param)
        return [{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]

    def _build_scheduler(self, steps_per_epoch):
        if self.scheduler_name is None:
            return None
        # over the whole run (or stage), also when it resumes part-way
        total_steps = max(1, steps_per_epoch * (self.epochs - self.schedule_start_epoch))
        warmup = min(self.warmup_steps, total_steps - 1)

        def factor(step):
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total_steps - warmup)
            if self.scheduler_name == "warmup_cosine":
                return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
            return max(0.0, 1.0 - progress)

        return optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _forward(self, loss_func, interaction):
        if self.autocast_dtype is not None:
            with torch.autocast(device_type="cuda", dtype=self.autocast_dtype):
                return loss_func(interaction)
        with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
            return loss_func(interaction)

    def _micro_batches(self, interaction):
        """(part, share of the batch's rows): the batch in pieces of at most ``train_micro_batch_size``
        rows (activations for backward are kept for one piece at a time), or whole."""
        rows = len(interaction)
        if not self.micro_batch_rows or rows <= self.micro_batch_rows:
            yield interaction, 1.0
            return
        for start in range(0, rows, self.micro_batch_rows):
            stop = min(start + self.micro_batch_rows, rows)
            yield interaction[start:stop], (stop - start) / rows  # a slice: views of the batch's tensors

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        steps_per_epoch = math.ceil(len(train_data) / self.accumulation_steps)
        if self.scheduler is None:
            self.scheduler = self._build_scheduler(steps_per_epoch)
        self._resume_point(train_data, epoch_idx)
        iter_data = (
            tqdm(train_data, total=len(train_data), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
            if show_progress else train_data
        )
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        total_loss = None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer.zero_grad()
        for batch_idx, interaction in enumerate(iter_data):
            interaction = interaction.to(self.device)
            if batch_idx % self.accumulation_steps == 0:
                group_batch_rows, group_rows = len(interaction), 0
            group_rows += len(interaction)
            # mean: each batch's mean loss weighted by its share of the update's rows, so k accumulated
            # batches make the mean-loss update of one k-times larger batch
            scale = self.accumulation_steps * group_batch_rows / len(interaction) if self.accumulation_loss == "mean" else 1
            batch_loss = None
            for part, share in self._micro_batches(interaction):
                sync_loss = 0
                if not self.config["single_spec"]:
                    # RecBole's DDP arms the gradient all-reduce for one backward pass: once per piece
                    self.set_reduce_hook()
                    sync_loss = self.sync_grad_loss()
                losses = self._forward(loss_func, part)
                loss = sum(losses) if isinstance(losses, tuple) else losses
                self._check_nan(loss)
                # a micro-batch's mean loss weighted by its share of the batch's rows: their gradients add up
                # to the gradient of the batch's mean loss
                ((loss * share + sync_loss) / scale).backward()
                values = tuple(share * value.item() for value in losses) if isinstance(losses, tuple) else share * loss.item()
                batch_loss = _add_losses(batch_loss, values)
            total_loss = _add_losses(total_loss, batch_loss)
            last_batch = batch_idx + 1 == len(train_data)
            if (batch_idx + 1) % self.accumulation_steps == 0 or last_batch:
                if self.accumulation_loss == "mean" and group_rows != self.accumulation_steps * group_batch_rows:
                    # an epoch's last, shorter group: the mean over the rows it has, as a short last batch
                    for parameter in trainable:
                        if parameter.grad is not None:
                            parameter.grad.mul_(self.accumulation_steps * group_batch_rows / group_rows)
                if self.clip_grad_norm:
                    clip_grad_norm_(trainable, **self.clip_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                if self.scheduler is not None:
                    self.scheduler.step()
        return total_loss

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        stages = self.model.training_stages() if hasattr(self.model, "training_stages") else None
        if not stages:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        resumed_epoch, stage_start = self.start_epoch, 0
        result = (self.best_valid_score, self.best_valid_result)
        for stage in stages:
            stage_end = stage_start + stage.epochs
            self.model.enter_stage(stage)
            if stage_end > resumed_epoch:
                self._begin_stage(stage, stage_start, max(stage_start, resumed_epoch), stage_end, verbose)
                result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
                if saved and valid_data and stage is not stages[-1]:
                    # the next stage starts from this stage's best weights, not its last epoch
                    self.load_model_checkpoint(self.saved_model_file)
            stage_start = stage_end
        return result

    def _begin_stage(self, stage, stage_start, start_epoch, end_epoch, verbose):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise RecboleMMError(f"Training stage '{stage.name}' leaves no trainable parameter.")
        self.optimizer = self._build_optimizer(params=trainable, learning_rate=stage.learning_rate or self.learning_rate)
        self.scheduler = None
        self.schedule_start_epoch, self.stage_name = stage_start, stage.name
        self.start_epoch, self.epochs = start_epoch, end_epoch
        self.cur_step = 0
        self.best_valid_score = -math.inf if self.valid_metric_bigger else math.inf
        self.best_valid_result = None
        # a resumed stage's optimizer and counters come from the resume point (_resume_point)
        if verbose:
            n_trainable = sum(p.numel() for p in trainable)
            self.logger.info(
                set_color(f"stage '{stage.name}'", "yellow")
                + f": epochs {start_epoch}..{end_epoch - 1}, {n_trainable} trainable parameters"
            )
