"""MMTrainer: safe checkpoints, learners, accumulation, schedules, stages."""
import math

import pytest
import torch
from recbole.trainer import Trainer

from recbole_mm.model.mmsasrec import MMSASRec
from recbole_mm.quick_start import build
from recbole_mm.trainer import MMTrainer, TrainingStage
from recbole_mm.trainer.trainer import resume_file_for
from recbole_mm.utils import RecboleMMError
from tests.conftest import scientific_slice_config, write_scientific_slice


@pytest.fixture
def slice_root(scientific_dir, in_tmp_cwd):
    root = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, root)
    return root


def read_model_yaml(name):
    import yaml

    from recbole_mm.config import PROPERTIES_DIR

    return yaml.safe_load((PROPERTIES_DIR / "model" / f"{name}.yaml").read_text())


def build_slice(root, model="MMSASRec", **overrides):
    return build(model, "SciSlice", config_dict=scientific_slice_config(root, **overrides))


def test_checkpoint_loads_with_weights_only_and_evaluates(slice_root):
    config, (train, valid, test), model, trainer = build_slice(slice_root)
    trainer.fit(train, valid, saved=True, show_progress=False)
    checkpoint = torch.load(trainer.saved_model_file, weights_only=True)
    assert checkpoint["config"]["model"] == "MMSASRec"
    assert checkpoint["config"]["MODEL_TYPE"] == "SEQUENTIAL"
    assert not any(key.startswith("item_feature") for key in checkpoint["state_dict"]), "tables are not saved"
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # evaluate(load_best_model=True) must restore the saved weights
    trainer.evaluate(test, load_best_model=True)
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_builtin_model_checkpoint_is_safe_too(slice_root):
    config, (train, valid, test), model, trainer = build_slice(slice_root, model="SASRec")
    trainer.fit(train, valid, saved=True, show_progress=False)
    result = trainer.evaluate(test, load_best_model=True)
    assert set(result) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
    assert torch.load(trainer.saved_model_file, weights_only=True)["config"]["model"] == "SASRec"


def test_checkpoint_from_another_model_is_refused(slice_root):
    _, (train, valid, _), _, sasrec_trainer = build_slice(slice_root, model="SASRec")
    sasrec_trainer.fit(train, valid, saved=True, show_progress=False)
    _, _, _, trainer = build_slice(slice_root)
    with pytest.raises(RecboleMMError, match="written by model 'SASRec'"):
        trainer.resume_checkpoint(sasrec_trainer.saved_model_file)


@pytest.fixture
def one_torch_thread():
    """Bit-identical CPU runs need one thread: with two, the matrix kernels' reductions round
    differently from run to run (two uninterrupted runs already differ in the last bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_continues_from_the_saved_epoch(slice_root, one_torch_thread):
    """Resuming from the -last.pth resume point gives the uninterrupted run's epoch exactly: same
    loss, same weights (dropout on and shuffled batches, so every random state matters)."""
    settings = dict(epochs=2, hidden_dropout_prob=0.3, lr_scheduler="warmup_linear", warmup_steps=1)
    _, (train, valid, _), model, trainer = build_slice(slice_root, **settings)
    trainer.fit(train, valid, saved=True, show_progress=False)
    straight = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    _, (train, valid, _), resumed_model, resumed = build_slice(slice_root, **settings)
    resumed.resume_checkpoint(resume_file_for(trainer.saved_model_file))
    assert resumed.start_epoch == 1
    resumed.fit(train, valid, saved=True, show_progress=False)
    assert list(resumed.train_loss_dict) == [1]
    assert resumed.train_loss_dict[1] == trainer.train_loss_dict[1]
    for name, tensor in straight.items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name


def test_resume_from_a_best_epoch_checkpoint_continues_after_it(slice_root):
    _, (train, valid, _), _, trainer = build_slice(slice_root)
    trainer.fit(train, valid, saved=True, show_progress=False)
    _, (train, valid, _), _, resumed = build_slice(slice_root, epochs=2)
    resumed.resume_checkpoint(trainer.saved_model_file)
    assert resumed.start_epoch == 1
    resumed.fit(train, valid, saved=True, show_progress=False)
    assert list(resumed.train_loss_dict) == [1]


def test_learners(slice_root):
    _, _, model, trainer = build_slice(slice_root, learner="nadam", weight_decay=0.01)
    assert isinstance(trainer.optimizer, torch.optim.NAdam)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01
    _, _, _, trainer = build_slice(slice_root, learner="adamw", weight_decay=0.05)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(RecboleMMError, match="learner: 'lamb' is not supported"):
        build_slice(slice_root, learner="lamb")


def deterministic_copy(slice_root, **overrides):
    config, (train, _, _), model, trainer = build_slice(
        slice_root, hidden_dropout_prob=0.0, attn_dropout_prob=0.0, feature_dropout_prob=0.0,
        learner="sgd", learning_rate=0.1, **overrides)
    return config, train, model, trainer


def test_gradient_accumulation_equals_one_big_batch(slice_root):
    _, train, model_a, trainer_a = deterministic_copy(slice_root, gradient_accumulation_steps=2)
    _, _, model_b, trainer_b = deterministic_copy(slice_root)
    model_b.load_state_dict(model_a.state_dict())
    full = next(iter(train))
    half = len(full) // 2
    full = full[torch.arange(2 * half)]
    halves = [full[torch.arange(half)], full[torch.arange(half, 2 * half)]]
    trainer_a._train_epoch(halves, 0)
    trainer_b._train_epoch([full], 0)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("micro_rows, whole_rows", [
    ([(0, 8), (8, 16), (16, 24), (24, 27)], [(0, 16), (16, 27)]),  # the last group: a full and a short micro-batch
    ([(0, 8), (8, 16), (16, 19)], [(0, 16), (16, 19)]),  # the last group: one short micro-batch
])
def test_an_epochs_last_shorter_group_is_the_mean_over_its_rows(slice_root, micro_rows, whole_rows):
    """With loss mean, micro-batches accumulated in groups of 2 make the updates of batches twice as
    large, the epoch's last, shorter group included (RecBole's short last batch: the mean over its rows)."""
    _, train, model_a, trainer_a = deterministic_copy(slice_root, gradient_accumulation_steps=2)
    _, _, model_b, trainer_b = deterministic_copy(slice_root)
    model_b.load_state_dict(model_a.state_dict())
    rows = next(iter(train))
    assert len(rows) >= 27
    trainer_a._train_epoch([rows[torch.arange(a, b)] for a, b in micro_rows], 0)
    trainer_b._train_epoch([rows[torch.arange(a, b)] for a, b in whole_rows], 0)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("accumulation", [1, 2])
def test_micro_batches_make_the_update_of_the_whole_batch(slice_root, accumulation):
    """train_micro_batch_size: a batch's forward/backward in pieces of at most that many rows (27 = 8 + 8 + 8 + 3)
    makes the update of the batch in one pass, alone and with gradient accumulation; the logged loss is the
    batch's mean loss."""
    _, train, model_a, trainer_a = deterministic_copy(slice_root, train_micro_batch_size=8,
                                                      gradient_accumulation_steps=accumulation)
    _, _, model_b, trainer_b = deterministic_copy(slice_root, gradient_accumulation_steps=accumulation)
    model_b.load_state_dict(model_a.state_dict())
    rows = next(iter(train))
    batches = [rows[torch.arange(0, 27)], rows[torch.arange(27, 40)]]
    pieces = []
    original = model_a.calculate_loss
    model_a.calculate_loss = lambda part: pieces.append(len(part)) or original(part)
    loss_a = trainer_a._train_epoch(batches, 0)
    loss_b = trainer_b._train_epoch(batches, 0)
    assert pieces == [8, 8, 8, 3, 8, 5]
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_fmrlrec_defaults_to_pieces_that_make_the_whole_batch_update(slice_root):
    """FMRLRec trains RecBole's 2048-row batches in pieces of 256 by default; pieces (here 8 of a 27-row batch) make
    the whole batch's update, its gradient clipped once (clip_grad_norm max 5 from FMRLRec.yaml acts here)."""
    overrides = dict(hidden_dropout_prob=0.0, lru_dropout_prob=0.0, learner="sgd", learning_rate=1.0,
                     weight_decay=0.0, hidden_size=16, mrl_sizes=[8, 16])
    config, (train, _, _), pieces_model, pieces_trainer = build_slice(slice_root, model="FMRLRec", **overrides)
    assert read_model_yaml("FMRLRec")["train_micro_batch_size"] == 256 == config["train_micro_batch_size"]
    pieces_trainer.micro_batch_rows = 8
    _, _, whole_model, whole_trainer = build_slice(slice_root, model="FMRLRec", train_micro_batch_size=None,
                                                   **overrides)
    whole_model.load_state_dict(pieces_model.state_dict())
    batch = next(iter(train))[slice(0, 27)]
    whole_model.calculate_loss(batch).backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in whole_model.parameters() if p.grad is not None]) > 5
    whole_model.zero_grad()
    pieces_trainer._train_epoch([batch], 0)
    whole_trainer._train_epoch([batch], 0)
    for (name, a), b in zip(pieces_model.named_parameters(), whole_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.parametrize("value", [0.5, -3, "many"])
def test_a_bad_micro_batch_size_is_refused(slice_root, value):
    with pytest.raises(RecboleMMError, match=f"train_micro_batch_size: {value!r} must be a positive number of rows"):
        deterministic_copy(slice_root, train_micro_batch_size=value)


def test_trainer_options_on_a_recbole_model_are_named_as_without_effect(slice_root, caplog):
    """RecBole's built-ins train with RecBole's trainer: MMTrainer's options set for them are reported, not dropped
    silently; a recbole-mm model reads them."""
    import logging

    options = dict(train_micro_batch_size=8, gradient_accumulation_steps=2, lr_scheduler="warmup_linear")
    with caplog.at_level(logging.WARNING):
        build_slice(slice_root, model="SASRec", **options)
    warned = [record.getMessage() for record in caplog.records if "RecBole's own trainer" in record.getMessage()]
    assert warned == ["SASRec trains with RecBole's own trainer, which does not read gradient_accumulation_steps, "
                      "train_micro_batch_size, lr_scheduler (recbole-mm's trainer options for recbole-mm models): "
                      "they have no effect on this run"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, _, _, trainer = build_slice(slice_root, **options)
    assert trainer.micro_batch_rows == 8 and trainer.accumulation_steps == 2
    assert not any("RecBole's own trainer" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_slice(slice_root, model="SASRec")
    assert not any("RecBole's own trainer" in record.getMessage() for record in caplog.records)


def test_warmup_cosine_schedule(slice_root):
    _, train, model, trainer = deterministic_copy(
        slice_root, lr_scheduler="warmup_cosine", warmup_steps=2, epochs=1)
    batches = [next(iter(train))] * 6  # one epoch of six optimizer steps
    seen = []
    trainer.scheduler = trainer._build_scheduler(steps_per_epoch=len(batches))
    original_step = trainer.scheduler.step

    def recording_step(*args, **kwargs):  # the lr the optimizer step just used
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return original_step(*args, **kwargs)

    trainer.scheduler.step = recording_step
    trainer._train_epoch(batches, 0)
    total, warmup, base = 6, 2, 0.1
    expected = [base * (s + 1) / (warmup + 1) if s < warmup
                else base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(total)]
    assert seen == pytest.approx(expected)


class StagedMMSASRec(MMSASRec):
    """Stage 'features' trains only the feature projection; stage 'all' trains everything."""

    def training_stages(self):
        return [TrainingStage("features", epochs=1, learning_rate=0.01), TrainingStage("all", epochs=1)]

    def enter_stage(self, stage):
        for name, parameter in self.named_parameters():
            parameter.requires_grad = stage.name == "all" or name.startswith("feature_projection")


def test_stages_freeze_what_they_say(slice_root, monkeypatch):
    config = scientific_slice_config(slice_root, **read_model_yaml("MMSASRec"))
    _, (train, valid, _), model, trainer = build(StagedMMSASRec, "SciSlice", config_dict=config)
    assert isinstance(model, StagedMMSASRec) and isinstance(trainer, MMTrainer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    snapshots = []
    original_fit = Trainer.fit  # RecBole's fit, run once per stage

    def fit_and_snapshot(self, *args, **kwargs):
        result = original_fit(self, *args, **kwargs)
        snapshots.append((self.optimizer.param_groups[0]["lr"],
                          {name: p.detach().clone() for name, p in model.named_parameters()}))
        return result

    monkeypatch.setattr(Trainer, "fit", fit_and_snapshot)
    trainer.fit(train, valid, saved=False, show_progress=False)
    assert [lr for lr, _ in snapshots] == [0.01, trainer.learning_rate]
    after_features = snapshots[0][1]
    for name, value in after_features.items():
        changed = not torch.equal(value, before[name])
        assert changed == name.startswith("feature_projection"), name
    assert not torch.equal(snapshots[1][1]["position_embedding.weight"], before["position_embedding.weight"])


class TwoEpochFirstStage(StagedMMSASRec):
    def training_stages(self):
        return [TrainingStage("features", epochs=2, learning_rate=0.01), TrainingStage("all", epochs=1)]


def test_next_stage_starts_from_the_previous_stages_best_epoch(slice_root):
    """Stage 'features' runs 2 epochs whose validation scores are 0.9 then 0.1: stage 'all' must start
    from the weights after epoch 0 (the saved best), not those after epoch 1."""
    config = scientific_slice_config(slice_root, **read_model_yaml("MMSASRec"))
    _, (train, valid, _), model, trainer = build(TwoEpochFirstStage, "SciSlice", config_dict=config)
    scores = iter([0.9, 0.1, 0.5])
    trainer._valid_epoch = lambda valid_data, show_progress=False: (next(scores), {"score": 0.0})
    after_epoch = []
    train_epoch = trainer._train_epoch

    def train_and_snapshot(*args, **kwargs):
        loss = train_epoch(*args, **kwargs)
        after_epoch.append({name: value.clone() for name, value in model.state_dict().items()})
        return loss

    trainer._train_epoch = train_and_snapshot
    at_stage_start = {}
    enter_stage = model.enter_stage

    def enter_and_snapshot(stage):
        at_stage_start[stage.name] = {name: value.clone() for name, value in model.state_dict().items()}
        enter_stage(stage)

    model.enter_stage = enter_and_snapshot
    trainer.fit(train, valid, saved=True, show_progress=False)
    assert len(after_epoch) == 3
    best_of_first_stage, last_of_first_stage = after_epoch[0], after_epoch[1]
    changed = [name for name in best_of_first_stage
               if not torch.equal(best_of_first_stage[name], last_of_first_stage[name])]
    assert changed and all(name.startswith("feature_projection") for name in changed)
    for name, value in at_stage_start["all"].items():
        assert torch.equal(value, best_of_first_stage[name]), name


def test_candidate_protocol_for_any_model(slice_root):
    """A built-in model ranked only on the fixed candidate sets: HR@1 is a fraction of users, and
    the same sets come back for a second build (fixed by seed)."""
    overrides = dict(candidate_protocol=True, metrics=["HR", "ValidRatio", "VHR"], topk=[1], valid_metric="HR@1")
    _, (train, valid, test), _, trainer = build_slice(slice_root, model="SASRec", **overrides)
    assert type(trainer).__name__.startswith("Candidate")
    trainer.fit(train, valid, saved=True, show_progress=False)
    first = trainer.evaluate(test, load_best_model=True)
    assert set(first) == {"hr@1", "validratio", "vhr@1"}
    assert first["validratio"] == 1.0 and first["vhr@1"] == first["hr@1"]
    assert 0.0 <= first["hr@1"] <= 1.0
    _, (_, _, test_again), _, trainer_again = build_slice(slice_root, model="SASRec", **overrides)
    trainer_again.model.load_state_dict(trainer.model.state_dict())
    assert trainer_again.evaluate(test_again, load_best_model=False) == first


def record_optimizer_steps(trainer):
    """The learning rate each optimizer step used, in order."""
    used = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    return used


def test_trainer_builds_warmup_linear_schedule_over_accumulated_steps(slice_root):
    """The trainer's own scheduler: 7 batches, accumulation 2 -> 4 optimizer steps an epoch (the
    last one on a single batch), 2 epochs -> 8 steps; linear warm-up over 2 steps, then linear decay."""
    _, train, _, trainer = deterministic_copy(
        slice_root, lr_scheduler="warmup_linear", warmup_steps=2, epochs=2, gradient_accumulation_steps=2)
    batches = [next(iter(train))] * 7
    used = record_optimizer_steps(trainer)
    assert trainer.scheduler is None
    trainer._train_epoch(batches, 0)
    assert len(used) == 4
    trainer._train_epoch(batches, 1)
    total, warmup, base = 8, 2, 0.1
    expected = [base * (s + 1) / (warmup + 1) if s < warmup else base * (1 - (s - warmup) / (total - warmup))
                for s in range(total)]
    assert used == pytest.approx(expected)


def test_clip_grad_norm_scales_the_whole_gradient(slice_root):
    """One SGD step with clip_grad_norm: update = -lr * g * max_norm / ||g||_2 (the norm over all
    trainable parameters together), with g computed here from the same batch."""
    _, train, model, trainer = deterministic_copy(slice_root, clip_grad_norm={"max_norm": 0.05, "norm_type": 2})
    batch = next(iter(train))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    model.zero_grad()
    model.calculate_loss(batch).backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gradients.values()))
    assert norm > 0.05 * 10  # clipping really scales
    model.zero_grad()
    trainer._train_epoch([batch], 0)
    for name, parameter in model.named_parameters():
        expected = before[name] - 0.1 * gradients.get(name, torch.zeros_like(parameter)) * 0.05 / (norm + 1e-6)
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-4, atol=1e-7, msg=name)
def test_mixed_precision_is_checked_and_cpu_runs_are_refused(slice_root):
    with pytest.raises(RecboleMMError, match="mixed_precision: 'fp8' is not known"):
        build_slice(slice_root, mixed_precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(RecboleMMError, match="needs a CUDA device"):
            build_slice(slice_root, mixed_precision="bf16", use_gpu=False)
    _, _, _, trainer = build_slice(slice_root)
    assert trainer.autocast_dtype is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_trains_one_epoch_on_cuda(slice_root):
    _, (train, _, _), model, trainer = build_slice(slice_root, "MMM4Rec", mixed_precision="bf16", hidden_size=16,
                                                   inner_size=32, d_state=8, head_dim=8, n_groups=2, train_batch_size=64)
    assert trainer.autocast_dtype == torch.bfloat16
    loss = trainer._train_epoch(train, 0)
    assert math.isfinite(loss)
