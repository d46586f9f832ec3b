"""Alias of an older command path: ``python -m recbole_mm.embedding_analysis`` runs ``python -m recbole_mm.tools.embedding_analysis``
(docs/architecture.md, "Command paths")."""
import sys

from recbole_mm.tools.embedding_analysis import main

if __name__ == "__main__":
    sys.exit(main())
