"""From cell records to table cells: mean ± std over seeds per (dataset, model), the columns a
dataset's table shows, which model is best per column, and how each value is printed."""
import statistics


RESOURCE_COLUMNS = (
    # (record key, header, lower is better)
    ("parameters", "trainable params", True),
    ("seconds_per_epoch", "s/epoch", True),
    ("epochs_to_best", "epochs to best", None),  # not a quality measure: never marked
    ("peak_rss_mib", "peak RSS MiB", True),
    ("peak_gpu_mib", "peak GPU MiB", True),
    ("wall_seconds", "wall s", True),  # the whole cell: also a pipeline's stages outside its epochs (MMESID, Speeder)
)


def metric_lower_is_better(metric_key):
    from recbole.evaluator.register import smaller_metrics

    return metric_key.split("@")[0].lower() in smaller_metrics


def summarize(records):
    """Group cell records by (dataset, model): per column the values over seeds, plus failures."""
    groups = {}
    for record in records:
        group = groups.setdefault((record["dataset"], record["model"]), {"values": {}, "errors": [], "seeds": []})
        group["seeds"].append(record["seed"])
        if record["status"] != "ok":
            group["errors"].append(f"seed {record['seed']}: {record['error']}")
            continue
        columns = {f"test {key}": value for key, value in record["test_result"].items()}
        columns.update({key: record.get(key) for key, _, _ in RESOURCE_COLUMNS})
        for column, value in columns.items():
            if value is not None:
                group["values"].setdefault(column, []).append(float(value))
    return groups


def mean_std(values):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def table_columns(groups, dataset):
    metric_columns, resource_columns = [], []
    for (group_dataset, _), group in groups.items():
        if group_dataset != dataset:
            continue
        for column in group["values"]:
            if column.startswith("test ") and column not in metric_columns:
                metric_columns.append(column)
    for key, header, _ in RESOURCE_COLUMNS:
        if any(key in group["values"] for (group_dataset, _), group in groups.items() if group_dataset == dataset):
            resource_columns.append(key)
    return metric_columns + resource_columns


def column_direction(column):
    """True: lower is better; False: higher is better; None: not ranked."""
    if column == "result":
        return None
    if column.startswith("test "):
        return metric_lower_is_better(column[len("test "):])
    return next(lower for key, _, lower in RESOURCE_COLUMNS if key == column)


def column_header(column):
    return next((header for key, header, _ in RESOURCE_COLUMNS if key == column), column)


def best_models(groups, dataset, column):
    """Models whose mean is the best in this column (all of them when tied); failed cells excluded."""
    lower = column_direction(column)
    if lower is None:
        return set()
    means = {model: mean_std(group["values"][column])[0] for (group_dataset, model), group in groups.items()
             if group_dataset == dataset and not group["errors"] and column in group["values"]}
    if not means:
        return set()
    best = (min if lower else max)(means.values())
    return {model for model, mean in means.items() if mean == best}


DECIMALS = {"parameters": 0, "seconds_per_epoch": 2, "epochs_to_best": 1, "peak_rss_mib": 0, "peak_gpu_mib": 0,
            "wall_seconds": 0}


def format_value(column, mean, std):
    decimals = 4 if column.startswith("test ") else DECIMALS[column]
    if std is None and column == "epochs_to_best":
        decimals = 0
    text = f"{mean:,.{decimals}f}"
    return text if std is None else f"{text} ± {std:,.{decimals}f}"


def short_error(text, limit=200):
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " …"


def cell_texts(groups, dataset, model, columns):
    group = groups[(dataset, model)]
    if group["errors"] and not group["values"]:
        return ["failed: " + short_error("; ".join(group["errors"]))] + ["–"] * (len(columns) - 1)
    texts = []
    for column in columns:
        mean, std = mean_std(group["values"].get(column, []))
        texts.append("–" if mean is None else format_value(column, mean, std))
    return texts
