"""Alias of an older command path: ``python -m recbole_mm.fmrlrec_tools`` runs ``python -m recbole_mm.tools.fmrlrec``
(docs/architecture.md, "Command paths")."""
import sys

from recbole_mm.tools.fmrlrec import main

if __name__ == "__main__":
    sys.exit(main())
