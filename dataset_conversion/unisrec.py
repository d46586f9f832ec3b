"""UniSRec / MISSRec / VQ-Rec benchmark folders -> the same data plus a RecBole ``<Dataset>.item`` of texts.

    python dataset_conversion/unisrec.py --source <unpacked UniSRec Scientific>   # -> ./dataset/Scientific

The feature hook already reads this format as it is (properties/dataset/Scientific.yaml): split ``.train/.valid/.test.inter`` whose item tokens are the row numbers of
``.item2index`` (ASIN -> row), raw float32 ``.feat1CLS``/``.feat3CLS`` tables (row k = item k, give
``dim``), and ``.text`` (ASIN -> text). What this importer adds:
  * ``<Dataset>.item`` (item_id:token = row number, as in the .inter files; asin:token; text:token_seq), so
    RecBole can load item texts (``load_col: {item: [item_id, text]}``) and encode_features.py can encode
    them with any text model (e.g. ``--modality minilm --field text``) next to the shipped tables;
  * ``<Dataset>.item2index`` rewritten as "row<TAB>row" (token = row, exactly the hook's contract, same
    mapping as the original), the original ASIN index kept as ``<Dataset>.asin2index``;
  * checks: feature row counts, .inter tokens within the index, items without text, malformed lines.
Everything else is linked (default) or copied (--copy) unchanged, so existing dataset yamls keep working
with ``--data_path=<output_dir>``.
"""
import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recbole_mm.utils.atomic import copy_file_atomic  # noqa: E402
from dataset_conversion.common import (  # noqa: E402
    BadInputReport,
    clean_field,
    conversion_is_current,
    default_data_dir,
    drop_stale_features,
    file_stamp,
    hash_outputs,
    load_manifest,
    log,
    run_converter,
    save_manifest,
    sha256_file,
    write_table,
    write_text_atomic,
)

CARRIED_SUFFIXES = ("train.inter", "valid.inter", "test.inter", "inter", "user2index", "text")
FEATURE_SUFFIXES = ("feat1CLS", "feat2CLS", "feat3CLS")
FEATURE_DIM = 512


def read_asin_index(path):
    rows = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{line_number}: expected '<ASIN>\\t<row>', got {line!r}")
            if parts[0] in rows:
                raise ValueError(f"{path}:{line_number}: ASIN {parts[0]} is listed again (rows {rows[parts[0]]} and "
                                 f"{parts[1]}); the index must map each ASIN to one row")
            rows[parts[0]] = int(parts[1])
    if sorted(rows.values()) != list(range(len(rows))):
        raise ValueError(f"{path}: rows must be exactly 0..N-1 once each")
    return rows


def read_texts(path, report):
    texts = {}
    with open(path, encoding="utf-8") as handle:
        handle.readline()  # item_id:token text:token_seq
        for line_number, line in enumerate(handle, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                report.add(".text: malformed line (skipped)", f"{path.name}:{line_number}")
                continue
            if parts[0] in texts:
                report.add(".text: duplicate item (first kept)", f"{path.name}:{line_number}")
                continue
            texts[parts[0]] = clean_field(parts[1])
    return texts


def check_inter_tokens(path, n_items, report):
    with open(path, encoding="utf-8") as handle:
        header = [field.split(":")[0] for field in handle.readline().rstrip("\n").split("\t")]
        item_columns = [n for n, name in enumerate(header) if name in ("item_id", "item_id_list")]
        for line_number, line in enumerate(handle, 2):
            parts = line.rstrip("\n").split("\t")
            tokens = [token for n in item_columns if n < len(parts) for token in parts[n].split()]
            if len(parts) != len(header) or not all(t.isdigit() and int(t) < n_items for t in tokens):
                report.add(f"{path.name}: line with item tokens outside 0..{n_items - 1} or wrong field count",
                           f"{path.name}:{line_number}")


def convert(source, output_dir=None, dataset=None, copy=False, force=False):
    source = Path(source)
    source_name = source.name
    dataset = dataset or source_name
    dataset_dir = Path(output_dir or default_data_dir()) / dataset
    index_path = source / f"{source_name}.item2index"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: --source must be a UniSRec-format folder <Name>/<Name>.item2index")
    carried = [suffix for suffix in CARRIED_SUFFIXES + FEATURE_SUFFIXES if (source / f"{source_name}.{suffix}").exists()]
    parameters = {"converter": "unisrec", "copy": copy,
                  "inputs": [file_stamp(source / f"{source_name}.{s}") for s in carried + ["item2index"]]}
    if not force and conversion_is_current(dataset_dir, dataset, parameters):
        log(f"{dataset}: outputs match the manifest, nothing to do (use --force to redo)")
        return dataset_dir, None

    report = BadInputReport()
    asin_rows = read_asin_index(index_path)
    n_items = len(asin_rows)
    for suffix in FEATURE_SUFFIXES:
        path = source / f"{source_name}.{suffix}"
        if path.exists() and path.stat().st_size != n_items * FEATURE_DIM * 4:
            report.add(f"{suffix}: size is not {n_items} x {FEATURE_DIM} float32 (set its dim in the yaml)", path.name)
    for suffix in ("train.inter", "valid.inter", "test.inter", "inter"):
        if (source / f"{source_name}.{suffix}").exists():
            check_inter_tokens(source / f"{source_name}.{suffix}", n_items, report)
    texts = read_texts(source / f"{source_name}.text", report) if "text" in carried else {}
    for asin in sorted(set(texts) - set(asin_rows)):
        report.add(".text: item not in item2index (ignored)", asin)

    dataset_dir.mkdir(parents=True, exist_ok=True)
    for suffix in carried:
        target = dataset_dir / f"{dataset}.{suffix}"
        if copy:
            copy_file_atomic(source / f"{source_name}.{suffix}", target)
        else:  # a new link beside the target, renamed over it: the old name stays valid until then
            link = target.with_name(f".{target.name}.link{os.getpid()}")
            link.unlink(missing_ok=True)
            os.symlink((source / f"{source_name}.{suffix}").resolve(), link)
            os.replace(link, target)
    by_row = sorted(asin_rows.items(), key=lambda pair: pair[1])
    for asin, _ in by_row:
        if not texts.get(asin):
            report.add("items without text (empty text field)", asin)
    write_table(dataset_dir / f"{dataset}.item", ["item_id:token", "asin:token", "text:token_seq"],
                ((row, asin, texts.get(asin, "")) for asin, row in by_row))
    write_text_atomic(dataset_dir / f"{dataset}.asin2index", "".join(f"{asin}\t{row}\n" for asin, row in by_row))
    write_text_atomic(dataset_dir / f"{dataset}.item2index", "".join(f"{row}\t{row}\n" for _, row in by_row))

    outputs = [f"{dataset}.{name}" for name in ("item", "asin2index", "item2index")] + [f"{dataset}.{s}" for s in carried]
    manifest = load_manifest(dataset_dir, dataset)
    drop_stale_features(dataset_dir, manifest, sha256_file(dataset_dir / f"{dataset}.item2index"))
    stats = {"items": n_items, "items_with_text": sum(1 for asin in asin_rows if texts.get(asin))}
    manifest["conversion"] = {"parameters": parameters, "stats": stats, "bad_input": report.as_dict(),
                              "outputs": hash_outputs(dataset_dir, outputs)}
    save_manifest(dataset_dir, dataset, manifest)
    log(f"{dataset}: {n_items} items ({stats['items_with_text']} with text), {'copied' if copy else 'linked'}"
        f" {', '.join(carried)} -> {dataset_dir}")
    log(report.summary(f"{dataset}: bad input"))
    return dataset_dir, stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="UniSRec-format folder (e.g. the unpacked Scientific benchmark)")
    parser.add_argument("--output_dir", default=None, help="RecBole data_path to write into (default: $RECBOLE_MM_DATA, else ./dataset)")
    parser.add_argument("--dataset", help="output name (default: the source folder name)")
    parser.add_argument("--copy", action="store_true", help="copy the source files instead of symlinking them")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    convert(args.source, args.output_dir, args.dataset, args.copy, args.force)


if __name__ == "__main__":
    sys.exit(run_converter(main))
