"""Alias of an older command path: ``python -m recbole_mm.pipelines.mmesid`` runs ``python -m recbole_mm.quick_start.mmesid``
(docs/architecture.md, "Command paths")."""
import sys

from recbole_mm.quick_start.mmesid import main

if __name__ == "__main__":
    sys.exit(main())
