"""Alias of an older command path: ``python -m recbole_mm.distributed`` runs ``python -m recbole_mm.quick_start.distributed``
(docs/architecture.md, "Command paths")."""
import sys

from recbole_mm.quick_start.distributed import main

if __name__ == "__main__":
    sys.exit(main())
