"""The statistics of the accuracy study, through scipy and statsmodels.

Every arm answers the same test questions, so comparisons are paired: per (size, seed) the exact
McNemar test (statsmodels) and a paired bootstrap interval over questions (scipy); per size the
exact McNemar test of the discordant pairs summed over seeds (the stratified test: each (seed,
question) pair is a stratum, as in the Mantel-Haenszel view of matched pairs), a two-level
bootstrap interval, and Holm's correction across sizes (statsmodels).

The two-level bootstrap is the one part written here: scipy's ``bootstrap`` resamples one level.
Each replicate draws seeds with replacement, then test questions with replacement; the questions
are drawn once per replicate for all its seeds, because every seed answers the same test
questions (drawing them per seed would treat the question noise as independent across seeds and
make the interval too narrow).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COMPARISONS = (
    ("nlft", "sft"),
    ("nlft", "nlft_rule"),
    ("nlft", "sft_correct"),
    ("nlft", "sft_reference"),
    ("sft", "base"),
    ("nlft", "base"),
)


def paired_table(a: Sequence[bool], b: Sequence[bool]) -> list[list[int]]:
    """[[both right, only a right], [only b right, both wrong]]."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]


def mcnemar_p(table: list[list[int]]) -> float:
    """Two-sided exact McNemar p-value of a paired 2x2 table (statsmodels); 1.0 with no discordant pair."""
    from statsmodels.stats.contingency_tables import mcnemar

    if table[0][1] + table[1][0] == 0:
        return 1.0
    return float(mcnemar(table, exact=True).pvalue)


def paired_interval(a: Sequence[bool], b: Sequence[bool], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of ``mean(b) - mean(a)`` over questions resampled in pairs (scipy)."""
    from scipy.stats import bootstrap

    x, y = np.asarray(a, float), np.asarray(b, float)
    if np.array_equal(x, y):  # no discordant pair: every resample gives 0
        return (0.0, 0.0)
    result = bootstrap(
        (x, y),
        lambda u, v, axis: v.mean(axis=axis) - u.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def two_level_interval(differences: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of ``differences`` [seeds, questions] (per-question
    b - a in {-1, 0, 1}): each replicate resamples the seeds, then the questions (once for all its
    seeds: they share the test questions)."""
    d = np.asarray(differences, float)
    seeds, questions = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # [chunk, seeds, questions] at a time
        count = min(500, resamples - start)
        s = rng.integers(0, seeds, size=(count, seeds))
        q = rng.integers(0, questions, size=(count, questions))
        picked = d[s[:, :, None], q[:, None, :]]
        means[start : start + count] = picked.mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels ``multipletests``)."""
    from statsmodels.stats.multitest import multipletests

    if not pvalues:
        return []
    return [float(p) for p in multipletests(list(pvalues), method="holm")[1]]


def comparison_rows(runs: dict, settings) -> list[dict]:
    """Per size and comparison (b - a, :data:`COMPARISONS` whose runs exist): the mean difference
    over seeds, its two-level interval, the per-seed differences, intervals and McNemar p, the
    stratified p over seeds and its Holm correction across sizes (within each comparison)."""
    rows = []
    for b_arm, a_arm in COMPARISONS:
        family = []
        for n in settings.n:
            keys = [(_key(a_arm, n, s), _key(b_arm, n, s)) for s in settings.seeds]
            if not all(a in runs and b in runs for a, b in keys):
                continue
            a_rows, b_rows = [runs[a] for a, _ in keys], [runs[b] for _, b in keys]
            tables = [paired_table(a["per_question"], b["per_question"]) for a, b in zip(a_rows, b_rows, strict=True)]
            summed = np.sum(np.asarray(tables), axis=0).tolist()
            diffs = np.asarray([np.asarray(b["per_question"], float) for b in b_rows]) - np.asarray(
                [np.asarray(a["per_question"], float) for a in a_rows]
            )
            seed_diffs = diffs.mean(axis=1)
            family.append(
                {
                    "n": n,
                    "comparison": f"{b_arm} - {a_arm}",
                    "a": a_arm,
                    "b": b_arm,
                    "a_accuracy": float(np.mean([r["accuracy"] for r in a_rows])),
                    "b_accuracy": float(np.mean([r["accuracy"] for r in b_rows])),
                    "difference": float(seed_diffs.mean()),
                    "ci95": list(two_level_interval(diffs, settings.bootstrap_resamples, seed=n)),
                    "seeds": list(settings.seeds),
                    "seed_differences": [float(x) for x in seed_diffs],
                    "seed_ci95": [
                        list(
                            paired_interval(a["per_question"], b["per_question"], settings.bootstrap_resamples, seed=s)
                        )
                        for s, a, b in zip(settings.seeds, a_rows, b_rows, strict=True)
                    ],
                    "mcnemar_p": [mcnemar_p(t) for t in tables],
                    "discordant": {"only_b": summed[1][0], "only_a": summed[0][1]},
                    "p": mcnemar_p(summed),
                }
            )
        for row, adjusted in zip(family, holm([r["p"] for r in family]), strict=True):
            row["p_holm"] = adjusted
        rows += family
    return rows


def _key(arm: str, n: int, seed: int) -> str:
    return "base" if arm == "base" else f"{arm}_n{n}_s{seed}"
