"""A table's output files: ``table.md``, ``table.csv``, ``cells.csv`` and ``table.tex``."""
import csv
from pathlib import Path

from recbole_mm.experiments.summary import (
    RESOURCE_COLUMNS,
    best_models,
    cell_texts,
    column_header,
    mean_std,
    short_error,
    table_columns,
)


def write_markdown(path, groups, datasets, models, seeds, header_lines):
    lines = ["# recbole-mm side-by-side results", ""] + header_lines + [""]
    for dataset in datasets:
        columns = table_columns(groups, dataset) or ["result"]
        lines += [f"## {dataset}", "", "| model | " + " | ".join(column_header(c) for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        bests = {column: best_models(groups, dataset, column) for column in columns}
        for model in models:
            texts = cell_texts(groups, dataset, model, columns)
            group = groups[(dataset, model)]
            if not group["errors"]:
                texts = [f"**{text}**" if model in bests[column] else text for column, text in zip(columns, texts)]
            elif group["values"]:  # some seeds failed: say so, do not rank it
                texts[0] += f" (failed: {len(group['errors'])} of {len(group['seeds'])} seeds)"
            lines.append(f"| {model} | " + " | ".join(texts) + " |")
        lines.append("")
    failures = [f"- {model} / {dataset}: " + short_error("; ".join(group["errors"]), 1000)
                for (dataset, model), group in groups.items() if group["errors"]]
    if failures:
        lines += ["Failed cells (retried on the next run):", ""] + failures + [""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def write_csv(path, groups, datasets, models):
    columns = []
    for dataset in datasets:
        columns += [c for c in table_columns(groups, dataset) if c not in columns]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["dataset", "model", "seeds", "failed"] +
                        [name for c in columns for name in (f"{c} mean", f"{c} std", f"{c} best")])
        for dataset in datasets:
            bests = {column: best_models(groups, dataset, column) for column in columns}
            for model in models:
                group = groups[(dataset, model)]
                row = [dataset, model, len(group["seeds"]), "; ".join(group["errors"])]
                for column in columns:
                    mean, std = mean_std(group["values"].get(column, []))
                    row += [mean if mean is not None else "", std if std is not None else "",
                            int(model in bests[column])]
                writer.writerow(row)


def write_cells_csv(path, records):
    metric_keys = []
    for record in records:
        metric_keys += [k for k in record.get("test_result", {}) if k not in metric_keys]
    fields = ["dataset", "model", "seed", "status", "reused", "config_hash"] + [f"test {k}" for k in metric_keys] + \
        [key for key, _, _ in RESOURCE_COLUMNS] + ["epochs", "error"]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            row = {**record, **{f"test {k}": v for k, v in record.get("test_result", {}).items()}}
            writer.writerow({field: row.get(field, "") for field in fields})


def latex_escape(text):
    return str(text).replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&") \
        .replace("#", "\\#")


def write_latex(path, groups, datasets, models):
    parts = ["% recbole-mm side-by-side results (needs \\usepackage{booktabs})"]
    for dataset in datasets:
        columns = table_columns(groups, dataset) or ["result"]
        bests = {column: best_models(groups, dataset, column) for column in columns}
        parts += [f"% {latex_escape(dataset)}", "\\begin{tabular}{l" + "r" * len(columns) + "}", "\\toprule",
                  "Model & " + " & ".join(latex_escape(column_header(c)) for c in columns) + " \\\\", "\\midrule"]
        for model in models:
            group = groups[(dataset, model)]
            texts = [latex_escape(t).replace(" ± ", " $\\pm$ ") for t in cell_texts(groups, dataset, model, columns)]
            if group["errors"] and not group["values"]:
                texts = [f"\\multicolumn{{{len(columns)}}}{{l}}{{failed}}"]
            elif not group["errors"]:
                texts = [f"\\textbf{{{t}}}" if model in bests[c] else t for c, t in zip(columns, texts)]
            parts.append(latex_escape(model) + " & " + " & ".join(texts) + " \\\\")
        parts += ["\\bottomrule", "\\end{tabular}", ""]
    Path(path).write_text("\n".join(parts), encoding="utf-8")
