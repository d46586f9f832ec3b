"""Speeder benchmarks: prompt efficiency vs a LLaRA-style title prompt, and accuracy vs SASRec.

    python benchmarks/bench_speeder.py efficiency [--lengths 5 10 20 40] [--batch 16] [--repeats 3]
        [--llm_hidden_size 256 --llm_num_layers 4 --llm_num_heads 4]
    python benchmarks/bench_speeder.py accuracy [--stage_epochs 1 1 2] [--sasrec_epochs 30] [--n_users 1000]
    python benchmarks/bench_speeder.py learnability [--task copy|next] [--steps 1500] [--learning_rate 1e-3]
        [--config '{"candidate_slot_identity": true}']

efficiency: on ONE backbone (a Llama built from the given sizes, random weights: timings do not
depend on weights) and one word-level tokenizer covering both prompt styles, per history length n
(m = 5 candidates, random Scientific items, one batch of equal-length prompts, no padding):
tokens per item, prompt length, per-sample train step time (forward + backward of the LM loss on the
answer tokens) and per-sample inference time. Speeder: index token + one MoME item token per item,
answer = one label token (inference = one forward: constrained scoring). LLaRA-style: index + the
item's title words + one embedding slot per item, answer = the target's title (inference = greedy
generation of the title's length with the KV cache, as LLaRA answers with a title). The ratios are
the paper's Fig. 6 / Fig. 8 quantities (paper, Llama2-7B on A40s: 2.5x train, ~4x inference).

accuracy: full Scientific (benchmark split), candidate protocol (5 candidates fixed by seed 2020):
Speeder (CPU default: small untrained Llama, three MPO stages) against SASRec and MMSASRec ranked on
the same candidate sets (``with_candidate_protocol``); HR@1 / ValidRatio / VHR@1 on test, and
Speeder's free-generation ValidRatio.

learnability: can the backbone learn to point at a candidate at all? Full Scientific, the last MPO
stage's parameters (text + image, no ID features, no PPT, histories cut to 20 items) trained with
Adam on batches of the training split; every ``--every`` steps the HR@1 of the first 512 validation
rows' fixed candidate sets (5 candidates, chance 0.2). ``--task copy`` replaces every target
(training and probe) by the history's last item, so the right answer is the candidate identical to
the most recent history item; ``--task next`` is the real next item. The probe also prints a
parameter-free heuristic on the same sets: the candidate whose centred feature is most
cosine-similar to the last history item's.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recbole_mm.config import default_data_path  # noqa: E402
from recbole_mm.evaluator.candidate_protocol import with_candidate_protocol  # noqa: E402
from recbole_mm.model.layers.llm import backbone_from_config  # noqa: E402
from recbole_mm.model.layers.mome import MultimodalItemCompressor  # noqa: E402
from recbole_mm.model.speeder import HybridPrompt  # noqa: E402
from recbole_mm.quick_start import build  # noqa: E402
from recbole_mm.experiments.measure import machine_description  # noqa: E402

CANDIDATE_LABELS = ["A", "B", "C", "D", "E"]


def scientific_titles():
    """Item titles (text before the first '. ') of Scientific, in .feat row order."""
    data = default_data_path() / "Scientific"
    index = dict(line.split("\t") for line in (data / "Scientific.item2index").read_text().splitlines())
    titles = {}
    for line in (data / "Scientific.text").read_text().splitlines()[1:]:
        asin, text = line.split("\t", 1)
        titles[int(index[asin])] = text.split(". ")[0]
    return [titles[row] for row in range(len(titles))]


def scientific_features():
    data = default_data_path() / "Scientific"
    return {
        name: torch.from_numpy(np.fromfile(data / f"Scientific.{suffix}", dtype="float32").reshape(-1, 512))
        for name, suffix in (("text", "feat1CLS"), ("image", "feat3CLS"))
    }


class TitlePrompt:
    """LLaRA-style hybrid prompt: per item its index, its title words and one embedding slot."""

    def __init__(self, speeder_prompt, titles, title_tokens):
        self.p = speeder_prompt
        # every title cut or cycled to ``title_tokens`` words (the paper's Fig. 8 fixes 20 per item),
        # so all prompts of a batch have the same length and no padding enters the timings
        encoded = [speeder_prompt.encode(title) or [speeder_prompt.pad] for title in titles]
        self.title_ids = [(ids * title_tokens)[:title_tokens] for ids in encoded]

    def recommendation(self, history, candidates):
        ids = self.p.history_ids(0)
        for position, item in enumerate(history):
            ids += self.p.position_words[position] + self.title_ids[item] + [self.p.placeholder]
        ids += self.p.candidates_head
        for label, item in zip(self.p.label_ids, candidates):
            ids += [label] + self.title_ids[item] + [self.p.placeholder]
        return ids + self.p.question


def median_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def efficiency(args):
    torch.manual_seed(0)
    titles = scientific_titles()
    features = scientific_features()
    n_items = len(titles)
    max_len = max(args.lengths)
    llm_config = {"llm_hidden_size": args.llm_hidden_size, "llm_num_layers": args.llm_num_layers,
                  "llm_num_heads": args.llm_num_heads, "llm_max_positions": 8192, "llm_tuning": "full"}
    vocab = HybridPrompt.vocabulary_texts(CANDIDATE_LABELS, max_len) + titles
    llm = backbone_from_config(llm_config, vocab_texts=vocab)
    prompt = HybridPrompt(llm.tokenizer, CANDIDATE_LABELS, max_len)
    mean_title = sum(len(prompt.encode(title)) for title in titles) / n_items
    answer_title_len = max(1, round(mean_title))
    title_prompt = TitlePrompt(prompt, titles, answer_title_len)
    compressor = MultimodalItemCompressor({"text": 512, "image": 512}, 64, llm.hidden_size, n_heads=2)
    m, batch = len(CANDIDATE_LABELS), args.batch

    def item_vectors(items):
        flat = items.reshape(-1)
        return compressor({name: table[flat] for name, table in features.items()}).view(*items.shape, -1)

    print(f"Speeder prompt efficiency vs LLaRA-style title prompt; machine: {machine_description()}")
    print(f"backbone: Llama hidden {args.llm_hidden_size}, {args.llm_num_layers} layers, vocab {len(llm.tokenizer)}; "
          f"batch {batch}; m = {m}; mean Scientific title = {mean_title:.1f} tokens -> every title (prompt and "
          f"answer) {answer_title_len} tokens; median of {args.repeats}")
    header = ("n", "tok/item S", "tok/item T", "prompt S", "prompt T", "train ms S", "train ms T", "train x",
              "infer ms S", "infer ms T", "infer x")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for n in args.lengths:
        generator = torch.Generator().manual_seed(n)
        histories = torch.randint(1, n_items, (batch, n), generator=generator)
        candidates = torch.randint(1, n_items, (batch, m), generator=generator)
        items = torch.cat([histories, candidates], dim=1)
        speeder_ids = [prompt.recommendation(n, m)[0]] * batch
        title_ids = [title_prompt.recommendation(h, c) for h, c in zip(histories.tolist(), candidates.tolist())]
        def inputs(rows, with_answer):
            rows = [row + answer for row, answer in zip(rows, with_answer)] if with_answer else rows
            ids = torch.tensor(rows)
            vectors = item_vectors(items[: len(rows)])
            return llm.build_inputs_embeds(ids, vectors), torch.ones_like(ids), ids

        speeder_answers = [[prompt.label_ids[0], prompt.eos]] * batch
        target_titles = [title_prompt.title_ids[int(c[0])] + [prompt.eos] for c in candidates]

        def train_step(rows, answers):
            embeds, mask, ids = inputs(rows, answers)
            logits = llm.model(inputs_embeds=embeds, attention_mask=mask).logits
            start = len(rows[0])
            answer_len = len(answers[0])
            loss = F.cross_entropy(logits[:, start - 1: start - 1 + answer_len].flatten(0, 1),
                                   ids[:, start: start + answer_len].flatten())
            loss.backward()
            llm.model.zero_grad(set_to_none=True)
            compressor.zero_grad(set_to_none=True)

        @torch.no_grad()
        def speeder_inference():
            embeds, mask, _ = inputs(speeder_ids, None)
            llm.next_token_logits(embeds, mask)

        @torch.no_grad()
        def title_inference():
            embeds, mask, _ = inputs(title_ids, None)
            llm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=answer_title_len,
                               min_new_tokens=answer_title_len, do_sample=False, pad_token_id=prompt.pad)

        for function in (lambda: train_step(speeder_ids, speeder_answers), lambda: train_step(title_ids, target_titles),
                         speeder_inference, title_inference):
            function()  # warm-up
        t = {
            "speeder_train": median_time(lambda: train_step(speeder_ids, speeder_answers), args.repeats) / batch,
            "title_train": median_time(lambda: train_step(title_ids, target_titles), args.repeats) / batch,
            "speeder_infer": median_time(speeder_inference, args.repeats) / batch,
            "title_infer": median_time(title_inference, args.repeats) / batch,
        }
        fixed = len(prompt.recommendation(0, 0)[0])
        width = len(title_ids[0])
        tok_s, tok_t = (len(speeder_ids[0]) - fixed) / (n + m), (width - fixed) / (n + m)
        print(f"| {n} | {tok_s:.1f} | {tok_t:.1f} | {len(speeder_ids[0])} | {width} | {1e3 * t['speeder_train']:.2f} | "
              f"{1e3 * t['title_train']:.2f} | {t['title_train'] / t['speeder_train']:.1f} | "
              f"{1e3 * t['speeder_infer']:.2f} | {1e3 * t['title_infer']:.2f} | {t['title_infer'] / t['speeder_infer']:.1f} |",
              flush=True)


def accuracy(args):
    common = {"metrics": ["HR", "ValidRatio", "VHR"], "topk": [1], "valid_metric": "VHR@1", "show_progress": False,
              "num_candidates": 5, "candidate_seed": 2020, "checkpoint_dir": args.checkpoint_dir,
              "id_sasrec": {"hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
                            "epochs": args.id_sasrec_epochs, "learning_rate": 0.001, "train_batch_size": 256}}
    dataset = "Scientific"
    if args.n_users:  # the first n_users users of Scientific (benchmark format, full feature tables)
        from tests.conftest import scientific_slice_config, write_scientific_slice

        root = Path(tempfile.mkdtemp(prefix="bench_speeder_"))
        write_scientific_slice(default_data_path() / "Scientific", root, n_users=args.n_users)
        slice_config = scientific_slice_config(root, hidden_size=64, inner_size=256)
        for key in ("epochs", "train_batch_size", "eval_batch_size"):  # the models' own yaml values
            del slice_config[key]
        common.update(slice_config)
        dataset = "SciSlice"
    results = []
    start = time.perf_counter()
    config, (train, valid, test), model, trainer = build(
        "Speeder", dataset, config_dict={**common, "stage_epochs": args.stage_epochs}
    )
    trainer.fit(train, valid, saved=True, show_progress=False)
    result = trainer.evaluate(test, load_best_model=True)
    results.append(("Speeder", "constrained", result, time.perf_counter() - start))
    print(results[-1], flush=True)
    model.inference = "generate"
    start = time.perf_counter()
    results.append(("Speeder", "generate", trainer.evaluate(test, load_best_model=False), time.perf_counter() - start))
    print(results[-1], flush=True)
    for model_name in args.baselines:
        start = time.perf_counter()
        config, (train, valid, test), model, trainer = build(
            model_name, dataset, config_dict={**common, "epochs": args.sasrec_epochs, "stopping_step": 5, "train_batch_size": 256}
        )
        trainer = with_candidate_protocol(type(trainer))(config, model)
        trainer.fit(train, valid, saved=True, show_progress=False)
        result = trainer.evaluate(test, load_best_model=True)
        results.append((model_name, "rank", result, time.perf_counter() - start))
        print(results[-1], flush=True)
    users = f"first {args.n_users} users of Scientific" if args.n_users else "Scientific"
    print(f"Candidate protocol, test split of {users} (5 candidates, seed 2020); machine: {machine_description()}")
    print(f"Speeder: stage_epochs {args.stage_epochs}, CPU default backbone (untrained Llama, Speeder.yaml sizes)")
    print("| model | answer | HR@1 | ValidRatio | VHR@1 | wall s |")
    print("|---|---|---|---|---|---|")
    for name, mode, result, seconds in results:
        print(f"| {name} | {mode} | {result['hr@1']:.4f} | {result['validratio']:.4f} | {result['vhr@1']:.4f} | {seconds:.0f} |")


def learnability(args):
    import json

    config_dict = {"show_progress": False, "MAX_ITEM_LIST_LENGTH": 20, "ppt_rate": 0.0, "id_features": "none",
                   "stage_modalities": [["text", "image"]], "stage_epochs": [1], "checkpoint_dir": args.checkpoint_dir,
                   **json.loads(args.config)}
    config, (train, valid, _), model, _ = build("Speeder", "Scientific", config_dict=config_dict)
    model.enter_stage(model.training_stages()[-1])
    probe = []
    for batch in valid:
        probe.append(batch[0])
        if sum(len(rows) for rows in probe) >= 512:
            break

    def with_task(interaction):
        if args.task == "copy":
            history, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
            interaction[model.POS_ITEM_ID] = history[torch.arange(len(history)), length - 1]
        return interaction

    def probe_hr1(score):
        hits = rows = 0
        with torch.no_grad():
            for interaction in probe:
                interaction = with_task(interaction)
                candidates, slots = model.evaluation_candidates(interaction)
                hits += int((score(interaction, candidates).argmax(dim=1) == slots).sum())
                rows += len(slots)
        return hits / rows

    for modality in ("text", "image"):
        table = model.feature_table(modality)
        table = F.normalize(table - table[1:].mean(dim=0), dim=-1)

        def nearest_to_last(interaction, candidates, table=table):
            history, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
            last = history[torch.arange(len(history)), length - 1]
            return (table[candidates] * table[last].unsqueeze(1)).sum(dim=-1)

        print(f"heuristic: candidate nearest to the last history item ({modality}, centred cosine): "
              f"HR@1 {probe_hr1(nearest_to_last):.3f}", flush=True)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    print(f"task {args.task}, lr {args.learning_rate}, config {args.config}; machine: {machine_description()}")
    print("| step | train loss (mean since last row) | probe HR@1 | s |")
    print("|---|---|---|---|")
    model.eval()
    print(f"| 0 | - | {probe_hr1(model.candidate_scores):.3f} | 0 |", flush=True)
    step, losses, start = 0, [], time.perf_counter()
    while step < args.steps:
        for interaction in train:
            model.train()
            loss = model.calculate_loss(with_task(interaction))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if step % args.every == 0 or step == args.steps:
                model.eval()
                print(f"| {step} | {statistics.mean(losses):.3f} | {probe_hr1(model.candidate_scores):.3f} | "
                      f"{time.perf_counter() - start:.0f} |", flush=True)
                losses = []
            if step >= args.steps:
                break


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    eff = sub.add_parser("efficiency")
    eff.add_argument("--lengths", type=int, nargs="+", default=[5, 10, 20, 40])
    eff.add_argument("--batch", type=int, default=16)
    eff.add_argument("--repeats", type=int, default=3)
    eff.add_argument("--llm_hidden_size", type=int, default=256)
    eff.add_argument("--llm_num_layers", type=int, default=4)
    eff.add_argument("--llm_num_heads", type=int, default=4)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--stage_epochs", type=int, nargs=3, default=[1, 1, 2])
    acc.add_argument("--sasrec_epochs", type=int, default=30)
    acc.add_argument("--baselines", nargs="*", default=["SASRec", "MMSASRec"])
    acc.add_argument("--id_sasrec_epochs", type=int, default=5)
    acc.add_argument("--n_users", type=int, default=0, help="use only the first n users (0 = all)")
    acc.add_argument("--checkpoint_dir", default=os.path.join(tempfile.gettempdir(), "bench_speeder_saved"))
    learn = sub.add_parser("learnability")
    learn.add_argument("--task", choices=["copy", "next"], default="copy")
    learn.add_argument("--steps", type=int, default=1500)
    learn.add_argument("--every", type=int, default=250)
    learn.add_argument("--learning_rate", type=float, default=1e-3)
    learn.add_argument("--config", default="{}", help="JSON config overrides, e.g. '{\"llm_num_layers\": 4}'")
    learn.add_argument("--checkpoint_dir", default=os.path.join(tempfile.gettempdir(), "bench_speeder_saved"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a shared machine: oversubscribed OpenMP threads spin)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"efficiency": efficiency, "accuracy": accuracy, "learnability": learnability}[args.command](args)


if __name__ == "__main__":
    main()
