"""Command line: python run_recbole_mm.py --model=MMSASRec --dataset=Scientific [--key=value ...]"""
import sys

from recbole_mm.quick_start.cli import main

if __name__ == "__main__":
    sys.exit(main())
