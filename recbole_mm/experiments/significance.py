"""Paired significance of one model against a reference on the same test users.

Each seed's run of the model is paired with the reference's run of the same seed, user by user
(users matched by token); the pairs of every seed are pooled, so n = users x seeds. Reported: the
two means, the relative change, and the p-values of the paired t-test and of the Wilcoxon
signed-rank test (two-sided, scipy).
"""
import numpy as np
from scipy import stats


def paired_values(records, reference_records, metric):
    """Pooled (model, reference) value arrays of ``metric`` over the seeds both have."""
    reference_by_seed = {record["seed"]: record for record in reference_records}
    model_values, reference_values = [], []
    for record in records:
        reference = reference_by_seed.get(record["seed"])
        if reference is None:
            continue
        theirs = dict(zip(reference["per_user"]["users"], reference["per_user"]["metrics"][metric]))
        for user, value in zip(record["per_user"]["users"], record["per_user"]["metrics"][metric]):
            if user in theirs:
                model_values.append(value)
                reference_values.append(theirs[user])
    return np.asarray(model_values, dtype=np.float64), np.asarray(reference_values, dtype=np.float64)


def compare(records, reference_records, metric):
    """``{n, mean, reference_mean, relative_change, t_p, wilcoxon_p}``; None without common pairs."""
    values, reference = paired_values(records, reference_records, metric)
    if len(values) == 0:
        return None
    differences = values - reference
    if not differences.any():  # identical runs: no evidence of any difference
        t_p = wilcoxon_p = 1.0
    else:
        t_p = float(stats.ttest_rel(values, reference).pvalue)
        wilcoxon_p = float(stats.wilcoxon(values, reference).pvalue)
    reference_mean = float(reference.mean())
    return {
        "n": int(len(values)),
        "mean": float(values.mean()),
        "reference_mean": reference_mean,
        "relative_change": float(values.mean() / reference_mean - 1) if reference_mean else None,
        "t_p": t_p,
        "wilcoxon_p": wilcoxon_p,
    }
