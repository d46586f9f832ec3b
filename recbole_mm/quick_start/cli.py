"""The training command: ``python run_recbole_mm.py``, ``python -m recbole_mm`` or ``recbole-mm``
(``--model=MMSASRec --dataset=Scientific [--key=value ...]``)."""
import argparse
import sys

from recbole_mm.quick_start.quick_start import run
from recbole_mm.utils import RecboleMMError


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Train and evaluate a recbole-mm or RecBole model. Any other --key=value overrides config.",
        allow_abbrev=False,  # --data=... is a config override, not an abbreviation of --dataset
    )
    parser.add_argument("--model", "-m", required=True, help="e.g. MMSASRec, FMRLRec, MMM4Rec, SASRec")
    parser.add_argument("--dataset", "-d", required=True, help="e.g. Scientific, Office")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    args, overrides = parser.parse_known_args(argv)
    config_files = args.config_files.strip().split() if args.config_files else None

    try:
        result = run(args.model, args.dataset, config_file_list=config_files, cmd_args=overrides)
    except RecboleMMError as error:
        print(f"recbole-mm: error: {error}", file=sys.stderr)
        return 2
    print(
        f"[recbole-mm] model={result['model']} dataset={result['dataset']} "
        f"valid={result['best_valid_result']} test={result['test_result']} checkpoint={result['checkpoint']}"
    )
    return 0

