"""The table runner's results store: one JSON file per finished (or failed) cell."""
import json
import os
from pathlib import Path


class ResultsStore:
    """One JSON file per cell under ``<root>/cells``, keyed by model, dataset, seed and config hash."""

    def __init__(self, root):
        self.cells_dir = Path(root) / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)

    def path(self, model, dataset, seed, hash_):
        return self.cells_dir / f"{model}_{dataset}_seed{seed}_{hash_}.json"

    def load(self, model, dataset, seed, hash_):
        path = self.path(model, dataset, seed, hash_)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # a half-written file from an interrupted run: recompute the cell
            return None

    def save(self, record):
        path = self.path(record["model"], record["dataset"], record["seed"], record["config_hash"])
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
        os.replace(partial, path)  # atomic: a store never holds half a cell
