"""``python -m recbole_mm --model=MMSASRec --dataset=Scientific [--key=value ...]``: the training command."""
import sys

from recbole_mm.quick_start.cli import main

sys.exit(main())
