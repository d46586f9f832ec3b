"""Alias of an older command path: ``python -m recbole_mm.tune`` runs ``python -m recbole_mm.experiments.tune``
(docs/architecture.md, "Command paths")."""
import sys

from recbole_mm.experiments.tune import main

if __name__ == "__main__":
    sys.exit(main())
