"""Speeder (recbole_mm/model/speeder.py) on a slice of Scientific with a tiny untrained Llama."""

import os
import re

import pytest
import torch

from recbole_mm.evaluator.candidate_protocol import with_candidate_protocol
from recbole_mm.model.speeder import most_recent_items, truncated_position_prompt
from recbole_mm.quick_start import build
from tests.conftest import scientific_slice_config, write_scientific_slice

TINY = dict(
    llm_hidden_size=16, llm_num_layers=1, llm_num_heads=2, mome_hidden_size=8, mome_inner_size=16,
    mome_dropout=0.0, train_batch_size=64, eval_batch_size=128, stage_epochs=[1, 1, 1], warmup_steps=0,
    answer_head="label",  # the paper's head; the pointer head has its own tests
    id_sasrec={"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "epochs": 1,
               "learning_rate": 0.001, "train_batch_size": 256},
)


@pytest.fixture(scope="module")
def workdir(scientific_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("speeder")
    write_scientific_slice(scientific_dir, root / "data", n_users=60)
    previous = os.getcwd()
    os.chdir(root)
    torch.set_num_threads(1)
    yield root
    os.chdir(previous)


def speeder_config(workdir, **overrides):
    config = scientific_slice_config(workdir / "data", **TINY)
    config["checkpoint_dir"] = str(workdir / "saved")
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def built(workdir):
    return build("Speeder", "SciSlice", config_dict=speeder_config(workdir))


def first_batch(loader):
    return next(iter(loader))


def eval_interaction(batched):
    return batched[0] if isinstance(batched, tuple) else batched


def test_ppl_truncation_against_loop():
    torch.manual_seed(0)
    table = torch.randn(6, 4)
    lengths = torch.tensor([1, 4, 6, 3])
    out = truncated_position_prompt(table, lengths, width=6)
    for b, n in enumerate(lengths.tolist()):
        for j in range(6):
            expected = table[j] if j < n else torch.zeros(4)
            assert torch.equal(out[b, j], expected)


def test_most_recent_items_keeps_the_tail():
    histories = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 0, 0, 0, 0], [1, 2, 3, 4, 0, 0]])
    lengths = torch.tensor([6, 2, 4])
    kept, new_lengths = most_recent_items(histories, lengths, 3)
    for row, n in zip(range(3), lengths.tolist()):
        tail = histories[row, :n].tolist()[-3:]
        assert kept[row].tolist() == tail + [0] * (3 - len(tail))
        assert new_lengths[row] == len(tail)


def test_prompt_has_two_tokens_per_item(built):
    _, _, model, _ = built
    prompt = model.prompt
    fixed, slots = prompt.recommendation(0, 0)
    for n in (1, 7, 20):
        ids, n_slots = prompt.recommendation(n, 5)
        assert n_slots == n + 5 and ids.count(prompt.placeholder) == n + 5
        assert len(ids) - len(fixed) == 2 * (n + 5)


def test_answer_loss_equals_hf_lm_loss(built):
    _, (train_data, _, _), model, _ = built
    model.eval()
    batch = first_batch(train_data)
    histories, lengths = batch[model.ITEM_SEQ][:8], batch[model.ITEM_SEQ_LEN][:8]
    candidates, slots = model.candidate_sampler.training_candidates(histories, batch[model.POS_ITEM_ID][:8])
    rows, items, mask = model._assemble(histories, lengths, candidates, "recommend")
    answers = torch.tensor(model.prompt.label_ids)[slots]
    loss = model._answer_loss(rows, items, mask, answers)
    # independent: HF's own causal-LM loss with every non-answer position labelled -100
    full = [row + [a, model.prompt.eos] for row, a in zip(rows, answers.tolist())]
    width = max(map(len, full))
    input_ids = torch.full((len(full), width), model.prompt.pad)
    labels = torch.full((len(full), width), -100)
    attention = torch.zeros((len(full), width), dtype=torch.long)
    for b, row in enumerate(full):
        input_ids[b, : len(row)] = torch.tensor(row)
        labels[b, len(row) - 2: len(row)] = torch.tensor(row[-2:])
        attention[b, : len(row)] = 1
    embeds = model.llm.build_inputs_embeds(input_ids, items, mask)
    hf = model.llm.model(inputs_embeds=embeds, attention_mask=attention, labels=labels)
    torch.testing.assert_close(loss, hf.loss, rtol=1e-5, atol=1e-5)


def test_constrained_scores_are_generation_logits_over_labels(built):
    _, (_, valid_data, _), model, _ = built
    model.eval()
    interaction = eval_interaction(first_batch(valid_data))
    with torch.no_grad():
        candidates, _ = model.evaluation_candidates(interaction)
        constrained = model.candidate_scores(interaction, candidates)
        # independent: the plain HF forward's logits at each prompt's last real token
        rows, items, mask = model._assemble(
            interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN], candidates, "recommend"
        )
        input_ids = torch.full((len(rows), max(map(len, rows))), model.prompt.pad)
        attention = torch.zeros_like(input_ids)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row)
            attention[b, : len(row)] = 1
        embeds = model.llm.build_inputs_embeds(input_ids, items, mask)
        logits = model.llm.model(inputs_embeds=embeds, attention_mask=attention).logits
        last = logits[torch.arange(len(rows)), attention.sum(1) - 1]
        label_ids = torch.tensor(model.prompt.label_ids)
        torch.testing.assert_close(constrained, last[:, label_ids], rtol=1e-4, atol=1e-4)
        assert torch.equal(constrained.argmax(1), last[:, label_ids].argmax(1))
        slots, generated = model.generate_answers(interaction, candidates)
        assert torch.equal(generated[:, 0], last.argmax(1))  # greedy first token
        first_is_label = torch.isin(generated[:, 0], label_ids)
        by_label = {int(t): k for k, t in enumerate(label_ids)}
        for row, slot, ok in zip(generated.tolist(), slots.tolist(), first_is_label.tolist()):
            text = model.llm.tokenizer.decode(row, skip_special_tokens=True).lower()
            named = {k for k, label in enumerate(model.prompt.labels) if label.lower() in re.findall(r"\w+", text)}
            assert slot == (next(iter(named)) if len(named) == 1 else -1)
            if ok and len(named) == 1:
                assert slot == by_label[row[0]]


def test_full_sort_predict_is_finite_exactly_on_fixed_candidates(built):
    _, (_, valid_data, _), model, _ = built
    model.eval()
    interaction = eval_interaction(first_batch(valid_data))
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        again = model.full_sort_predict(interaction)
    candidates, _ = model.evaluation_candidates(interaction)
    finite = torch.isfinite(scores)
    assert finite.sum(1).eq(model.num_candidates).all()
    assert torch.equal(finite.nonzero()[:, 1].view(len(scores), -1).sort(1).values, candidates.sort(1).values)
    torch.testing.assert_close(scores, again)


STAGE_PATTERNS = {
    # what the design says trains in each MPO stage (names, independent of the model's own groups)
    "1:text": [r"^position_prompt$", r"^llm\.", r"^compressor\.output_adapter\.", r"^compressor\.adapters\.text\.",
               r"^compressor\.modality_layers\.\d+\.experts\.text\."],
    "2:text+image": [r"^position_prompt$", r"^llm\.", r"^compressor\.output_adapter\.", r"^compressor\.adapters\.(text|image)\.",
                     r"^compressor\.gates\.image\.", r"^compressor\.modality_layers\.\d+\.experts\.(text|image)\.",
                     r"^compressor\.modality_layers\.\d+\.attention", r"^compressor\.multimodal_layers\."],
    "3:text+image+id": [r".*"],
}


def test_stage_freezing_only_listed_parameters_get_gradients(built):
    _, (train_data, _, _), model, _ = built
    model.train()
    batch = first_batch(train_data)
    stages = model.training_stages()
    assert [s.name for s in stages] == list(STAGE_PATTERNS)
    for stage in stages:
        model.enter_stage(stage)
        model.zero_grad(set_to_none=True)
        model.calculate_loss(batch).backward()
        for name, parameter in model.named_parameters():
            expected = any(re.match(p, name) for p in STAGE_PATTERNS[stage.name])
            assert parameter.requires_grad == expected, (stage.name, name)
            assert (parameter.grad is not None) == expected, (stage.name, name)
    model.zero_grad(set_to_none=True)


def test_three_stage_run_and_candidate_metrics(workdir):
    config, (train_data, valid_data, test_data), model, trainer = build(
        "Speeder", "SciSlice", config_dict=speeder_config(workdir, ppt_rate=0.5)
    )
    stages_entered = []
    enter = model.enter_stage
    model.enter_stage = lambda stage: (stages_entered.append(stage.name), enter(stage))
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    assert stages_entered == ["1:text", "2:text+image", "3:text+image+id"]
    result = trainer.evaluate(test_data, load_best_model=True)
    assert set(result) == {"hr@1", "validratio", "vhr@1"}
    hits, valid = answers_by_hand(model, test_data, "constrained")
    assert result["validratio"] == 1.0 == valid.float().mean()
    assert result["hr@1"] == pytest.approx(float(hits.sum() / valid.sum()), abs=1e-4)
    model.inference = "generate"
    generated = trainer.evaluate(test_data, load_best_model=False)
    hits, valid = answers_by_hand(model, test_data, "generate")
    assert generated["validratio"] == pytest.approx(float(valid.float().mean()), abs=1e-4)
    assert generated["hr@1"] == pytest.approx(float(hits.sum() / max(int(valid.sum()), 1)), abs=1e-4)
    assert generated["vhr@1"] == pytest.approx(float(hits.float().mean()), abs=1e-4)


def answers_by_hand(model, test_data, inference):
    """(hit, valid) per test sample: the constrained answer is the candidate with the largest label
    logit; the generated one is the candidate its parsed reply names (-1: none, an invalid answer)."""
    model.eval()
    hits, valid = [], []
    with torch.no_grad():
        for batched in test_data:
            interaction = eval_interaction(batched)
            candidates, _ = model.evaluation_candidates(interaction)
            if inference == "constrained":
                slots = model.candidate_scores(interaction, candidates).argmax(dim=1)
            else:
                slots, _ = model.generate_answers(interaction, candidates)
            answered = slots >= 0
            chosen = candidates.gather(1, slots.clamp(min=0)[:, None]).squeeze(1)
            hits.append(answered & (chosen == interaction[model.POS_ITEM_ID]))
            valid.append(answered)
    return torch.cat(hits), torch.cat(valid)


def test_sasrec_ranked_on_the_same_candidate_sets(workdir, built):
    _, (_, valid_data, _), speeder, speeder_trainer = built
    config, (_, sas_valid, _), sasrec, trainer = build(
        "SASRec", "SciSlice", config_dict=speeder_config(workdir, metrics=["HR", "ValidRatio", "VHR"], topk=[1],
                                                          valid_metric="VHR@1", num_candidates=5, candidate_seed=2020)
    )
    protocol_trainer = with_candidate_protocol(type(trainer))(config, sasrec)
    protocol_trainer.tot_item_num = sas_valid._dataset.item_num
    batched = first_batch(sas_valid)
    _, scores, _, _ = protocol_trainer._full_sort_batch_eval(batched)
    speeder.eval()
    speeder_trainer.tot_item_num = valid_data._dataset.item_num
    with torch.no_grad():  # both after RecBole's history masking
        _, speeder_scores, _, _ = speeder_trainer._full_sort_batch_eval(first_batch(valid_data))
    assert torch.equal(torch.isfinite(scores), torch.isfinite(speeder_scores))
    result = protocol_trainer.evaluate(sas_valid, load_best_model=False)
    assert result["validratio"] == 1.0 and result["vhr@1"] == result["hr@1"]


def test_id_features_from_a_given_table(workdir):
    import numpy as np

    table = np.random.default_rng(0).standard_normal((1585, 6)).astype(np.float32)
    np.save(workdir / "data" / "SciSlice" / "SciSlice.sasrec.npy", table)
    config = speeder_config(workdir, id_features="table", modalities=["text", "image", "id"])
    config["feature_tables"] = {**config["feature_tables"], "id": {"path": "SciSlice.sasrec.npy"}}
    _, (train_data, _, _), model, _ = build("Speeder", "SciSlice", config_dict=config)
    assert model.compressor.modalities == ["text", "image", "id"]
    assert model.feature_table("id").shape[1] == 6
    model.enter_stage(model.training_stages()[-1])
    assert torch.isfinite(model.calculate_loss(first_batch(train_data)))


def test_stage_with_unavailable_modality_is_a_clear_error(workdir):
    from recbole_mm.utils import RecboleMMError

    config = speeder_config(workdir, id_features="none", stage_modalities=[["text"], ["text", "id"]], stage_epochs=[1, 1])
    with pytest.raises(RecboleMMError, match="stage_modalities"):
        build("Speeder", "SciSlice", config_dict=config)


def test_full_ranking_metrics_are_refused(workdir):
    from recbole_mm.utils import RecboleMMError

    # scores are finite on 5 candidates only: Recall@10 would be 1 for every sample
    config = speeder_config(workdir, id_features="none", metrics=["Recall", "NDCG"], topk=[10], valid_metric="NDCG@10")
    with pytest.raises(RecboleMMError, match=r"metrics \['Recall', 'NDCG'\] would be meaningless"):
        build("Speeder", "SciSlice", config_dict=config)


def test_fits_a_fixed_batch(workdir):
    """The answer loss reaches the label logits through MoME, PPL, splicing and the LLM: a fixed
    batch with fixed candidates is learned (the untrained backbone cannot generalise from a slice,
    but it must be able to fit)."""
    config = speeder_config(workdir, id_features="none", stage_modalities=[["text", "image"]], stage_epochs=[1],
                            ppt_rate=0.0, llm_hidden_size=32, mome_hidden_size=16)
    _, (train_data, _, _), model, _ = build("Speeder", "SciSlice", config_dict=config)
    model.enter_stage(model.training_stages()[0])
    batch = first_batch(train_data)[:16]
    fixed = model.candidate_sampler.evaluation_candidates(batch[model.USER_ID], batch[model.ITEM_SEQ], batch[model.POS_ITEM_ID])
    model.candidate_sampler.training_candidates = lambda histories, targets: fixed
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model.candidate_scores(batch, fixed[0]).argmax(1) == fixed[1]).float().mean()
    assert accuracy == 1.0


def test_lora_stages_train_only_adapters_of_the_llm(workdir):
    config = speeder_config(workdir, llm_tuning="lora", lora_target_modules=["q_proj", "v_proj"])
    _, (train_data, _, _), model, _ = build("Speeder", "SciSlice", config_dict=config)
    batch = first_batch(train_data)
    for stage in model.training_stages():
        model.enter_stage(stage)
        model.zero_grad(set_to_none=True)
        model.calculate_loss(batch).backward()
        for name, parameter in model.llm.named_parameters():
            is_lora = "lora_" in name
            assert parameter.requires_grad == is_lora and (parameter.grad is not None) == is_lora, (stage.name, name)


def test_pointer_head_scores_each_slot_from_its_own_state(workdir):
    _, (train_data, _, _), model, _ = build("Speeder", "SciSlice", config_dict=speeder_config(
        workdir, answer_head="pointer"))
    model.eval()
    torch.nn.init.normal_(model.pointer.weight, std=0.3)  # not the identity, so W's orientation is checked
    batch = first_batch(train_data)
    histories, lengths = batch[model.ITEM_SEQ][:6], batch[model.ITEM_SEQ_LEN][:6]
    candidates, _ = model.candidate_sampler.training_candidates(histories, batch[model.POS_ITEM_ID][:6])
    rows, items, mask = model._assemble(histories, lengths, candidates, "recommend")
    with torch.no_grad():
        scores = model.candidate_scores({model.ITEM_SEQ: histories, model.ITEM_SEQ_LEN: lengths}, candidates)
        for b, row in enumerate(rows):  # one unpadded prompt at a time, its slots found by scanning its tokens
            embeds = model.llm.build_inputs_embeds(torch.tensor([row]), items[b : b + 1, mask[b]])
            states = model.llm.decoder(inputs_embeds=embeds).last_hidden_state[0]
            placeholders = [t for t, token in enumerate(row) if token == model.prompt.placeholder]
            answer = model.pointer.weight @ states[-1]
            for j, position in enumerate(placeholders[-candidates.shape[1]:]):
                expected = float(states[position] @ answer) / model.llm.hidden_size ** 0.5
                assert float(scores[b, j]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_pointer_loss_is_cross_entropy_over_the_slots_and_the_head_defaults(workdir):
    import numpy as np

    from recbole_mm.utils import RecboleMMError

    _, (train_data, _, _), model, _ = build("Speeder", "SciSlice", config_dict=speeder_config(
        workdir, answer_head="pointer", ppt_rate=0.0))
    model.eval()
    batch = first_batch(train_data)
    model.candidate_sampler.training_rng = np.random.default_rng(1)
    loss = model.calculate_loss(batch)
    model.candidate_sampler.training_rng = np.random.default_rng(1)  # the same training candidates
    candidates, slots = model.candidate_sampler.training_candidates(batch[model.ITEM_SEQ], batch[model.POS_ITEM_ID])
    scores = model.candidate_scores(batch, candidates)
    expected = -torch.log_softmax(scores, dim=1)[torch.arange(len(slots)), slots].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert model.pointer.weight.grad is not None and model.pointer.weight.grad.abs().sum() > 0
    # answer_head ~: the pointer without llm_path (the CPU default), the paper's label head with one
    assert build("Speeder", "SciSlice", config_dict=speeder_config(workdir, answer_head=None))[2].answer_head == "pointer"
    with pytest.raises(RecboleMMError, match="answer_head: pointer names exactly one candidate"):
        build("Speeder", "SciSlice", config_dict=speeder_config(workdir, answer_head="pointer", inference="generate"))


def test_feature_centring_against_numpy(workdir, built):
    import numpy as np

    _, _, model, _ = build("Speeder", "SciSlice", config_dict=speeder_config(workdir, feature_centring=True))
    plain = built[2]
    for modality in ("text", "image", "id"):
        raw = plain.feature_table(modality).numpy().astype(np.float64)
        present = plain.feature_mask(modality).numpy()
        expected = np.zeros_like(raw)
        centred = raw[present] - raw[present].mean(axis=0)
        expected[present] = centred / np.sqrt((centred ** 2).mean())
        np.testing.assert_allclose(model.feature_table(modality).numpy(), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(model.feature_mask(modality), plain.feature_mask(modality))
    assert not torch.equal(model.feature_table("text"), plain.feature_table("text"))  # the plain model is untouched


def test_candidate_slot_identity_adds_each_label_embedding_to_its_slot(workdir):
    _, (train_data, _, _), model, _ = build("Speeder", "SciSlice", config_dict=speeder_config(
        workdir, candidate_slot_identity=True))
    model.eval()
    batch = first_batch(train_data)
    histories, lengths = batch[model.ITEM_SEQ][:4], batch[model.ITEM_SEQ_LEN][:4]
    candidates, _ = model.candidate_sampler.training_candidates(histories, batch[model.POS_ITEM_ID][:4])
    _, items, _ = model._assemble(histories, lengths, candidates, "recommend")
    table = model.llm._causal_lm().get_input_embeddings().weight
    width = int(lengths.max())
    with torch.no_grad():
        plain = model.item_tokens(candidates)
        for slot, label in enumerate(model.prompt.labels[: candidates.shape[1]]):
            label_row = table[model.llm.tokenizer.convert_tokens_to_ids(label.lower())]
            torch.testing.assert_close(items[:, width + slot], plain[:, slot] + label_row)
        # history slots and PPT prompts are untouched
        _, ppt_items, _ = model._assemble(histories, lengths, candidates[:, :3], "ppt")
        torch.testing.assert_close(ppt_items[:, width:], plain[:, :3])


def test_tied_embeddings_share_one_table_and_train_it_from_both_ends(workdir):
    _, (train_data, _, _), model, _ = build("Speeder", "SciSlice", config_dict=speeder_config(
        workdir, llm_tie_embeddings=True))
    causal_lm = model.llm._causal_lm()
    assert causal_lm.get_output_embeddings().weight is causal_lm.get_input_embeddings().weight
    model.calculate_loss(first_batch(train_data)).backward()
    grad = causal_lm.get_input_embeddings().weight.grad
    never_in_a_prompt = [i for i in range(grad.shape[0]) if i not in set(model.prompt.label_ids)
                         and i != model.prompt.eos]
    # output-side gradient (softmax over the full vocabulary) reaches rows no prompt ever embeds
    assert grad[never_in_a_prompt].abs().sum() > 0


def test_speeder_trains_a_step_on_a_pretrained_local_checkpoint(workdir):
    from tests.test_llm import minilm_path

    _, (train_data, valid_data, _), model, _ = build("Speeder", "SciSlice", config_dict=speeder_config(
        workdir, llm_path=minilm_path(), lora_target_modules=["query", "value"], lora_rank=2, answer_head=None))
    assert model.answer_head == "label"  # answer_head ~ with a checkpoint: the paper's head
    assert model.llm.hidden_size == 384 and model.position_prompt.shape[1] == 384
    assert model.prompt.bos == [model.llm.tokenizer.cls_token_id] and model.prompt.eos == model.llm.tokenizer.sep_token_id
    loss = model.calculate_loss(first_batch(train_data))
    loss.backward()
    lora = [p for n, p in model.llm.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    model.eval()
    interaction = eval_interaction(first_batch(valid_data))
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert (torch.isfinite(scores).sum(dim=1) == model.num_candidates).all()


def test_a_staged_run_is_converged_only_when_its_last_stage_stops_early(workdir, monkeypatch):
    """The leaderboard's 'converged' for a model trained in stages: the stages' own epochs are the cap
    (``epochs`` is not what Speeder runs), and only an early stop of the last stage counts."""
    from recbole_mm.experiments import measure
    from recbole_mm.experiments.leaderboard import is_converged

    record = measure.measured_run("Speeder", "SciSlice", config_dict=speeder_config(
        workdir, id_features="none", stage_modalities=[["text"], ["text", "image"]], stage_epochs=[1, 1],
        epochs=300, stopping_step=10))
    assert (record["epochs"], record["epoch_cap"], record["stopped_early"]) == (2, 2, False)
    assert is_converged(record) is False

    class Stage:
        def __init__(self, name, epochs):
            self.name, self.epochs = name, epochs

    def fake_run(model, dataset, config_file_list, config_dict, saved, cmd_args, on_built, callback_fn):
        """Stage 'a' stops early after 1 of its 3 epochs, stage 'b' runs ``ran`` of its 4."""
        trainer = type("Trainer", (), {"stage_name": None, "_train_epoch": lambda self: None})()
        staged = type("Model", (), {"training_stages": lambda self: [Stage("a", 3), Stage("b", 4)]})()
        on_built({"epochs": 300}, staged, trainer, None)
        for name in ["a"] + ["b"] * config_dict["ran"]:
            trainer.stage_name = name
            trainer._train_epoch()
        return {}

    monkeypatch.setattr(measure, "run", fake_run)
    for ran, converged in ((4, False), (3, True)):
        record = measure.measured_run("Staged", "D", config_dict={"ran": ran})
        assert record["epoch_cap"] == 7 and record["epochs"] == 1 + ran
        assert is_converged(record) is converged  # 1 + 3 < 7 epochs, but stage 'b' ran out when ran=4
