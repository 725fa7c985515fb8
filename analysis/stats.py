"""Bootstrap CIs, paired permutation tests and Holm correction for comparing evaluation variants.

Usage::

    from analysis.stats import compare_variants, main_effects, summarize_variants

    summary = summarize_variants(long_df, "critic/score")  # per variant: n, mean, 95% CI
    table = compare_variants(long_df, "critic/score", baseline="base")  # paired tests vs the baseline
    effects = main_effects(long_df, ["config/lora_dropout"], "critic/score")  # "does higher dropout hurt?"

`long_df` is the eval stage's table (`eval.parquet`): `variant`, `example_id`, optionally `sample`, and score
columns that hold NaN where the judge gave no score. Missing scores are dropped, never read as 0, and every
result says how many were dropped. When several samples exist per example they are averaged per example
first and examples are the resampling unit, because samples of one prompt are not independent.
All resampling is seeded: the same call gives the same numbers.

The resampling is scipy's: intervals are `scipy.stats.bootstrap` (percentile method; a paired difference is
bootstrapped as the one array of per-pair differences, an unpaired one as two independently resampled
groups), and the exact sign-flip p-value (at most `exact_max_n` pairs) is `scipy.stats.permutation_test`
with `permutation_type="samples"` over all 2**n sign patterns. The Monte Carlo sign-flip p-value (more pairs)
is drawn here, `np.random.default_rng(seed).choice((-1.0, 1.0), size=(n_perm, n))`, because the report's
false-verdict simulation (tests/test_report.py) reproduces that draw sign for sign. What stays this
project's own: NaN handling, per-example averaging, pairing on `example_id`, Holm, and the verdicts.

Lower-level pieces: `bootstrap_mean_ci`, `paired_bootstrap_ci`, `paired_permutation_pvalue`, `holm`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

# Bound on one (resamples x n) index or sign matrix, so large tables are resampled in chunks (scipy's
# `batch`) instead of allocating n_boot * n values at once.
_MAX_DRAWS_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class MeanCI:
    """A mean with its percentile-bootstrap interval; `n` values were used, `n_missing` were NaN and dropped.

    Unpacks as a 3-tuple, so `mean, lo, hi = bootstrap_mean_ci(x)` works.
    """

    mean: float
    lo: float
    hi: float
    n: int
    n_missing: int
    level: float

    def __iter__(self) -> Iterator[float]:
        return iter((self.mean, self.lo, self.hi))


def _to_float(x: ArrayLike) -> np.ndarray:
    """1-D float array with pandas NA/None turned into NaN."""
    arr = pd.Series(x).to_numpy(dtype=float, na_value=np.nan)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of scores, got shape {arr.shape}")
    return arr


def _check_resampling(n: int, level: float = 0.5) -> None:
    if n < 1:
        raise ValueError(f"the number of resamples must be >= 1, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _percentile_ci(
    samples: tuple[np.ndarray, ...], statistic, n_boot: int, level: float, seed: int
) -> tuple[float, float]:
    """scipy's percentile-bootstrap interval of the vectorized `statistic`, each sample resampled on its own."""
    n = sum(len(s) for s in samples)
    res = stats.bootstrap(
        samples,
        statistic,
        n_resamples=n_boot,
        batch=max(1, _MAX_DRAWS_PER_CHUNK // n),
        vectorized=True,
        confidence_level=level,
        method="percentile",
        rng=seed,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _diff_of_means(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _mean_ci(values: np.ndarray, n_boot: int, level: float, seed: int) -> MeanCI:
    """Percentile-bootstrap CI of the mean of `values`, NaNs dropped and counted."""
    _check_resampling(n_boot, level)
    present = values[~np.isnan(values)]
    n_missing = int(len(values) - len(present))
    if len(present) == 0:
        return MeanCI(np.nan, np.nan, np.nan, 0, n_missing, level)
    mean = float(present.mean())
    # scipy refuses to resample a single value; every resample of it is that value.
    lo, hi = (mean, mean) if len(present) == 1 else _percentile_ci((present,), np.mean, n_boot, level, seed)
    return MeanCI(mean, lo, hi, len(present), n_missing, level)


def bootstrap_mean_ci(x: ArrayLike, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> MeanCI:
    """Mean of `x` and its percentile-bootstrap CI at `level`; NaN values are dropped and counted.

    Empty (or all-NaN) input gives NaN mean and bounds with n=0.
    """
    return _mean_ci(_to_float(x), n_boot, level, seed)


def _paired_differences(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, int]:
    """a - b over the pairs where both are present, and how many pairs were dropped."""
    a_arr, b_arr = _to_float(a), _to_float(b)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired inputs must have the same length, got {len(a_arr)} and {len(b_arr)}")
    both = ~(np.isnan(a_arr) | np.isnan(b_arr))
    return a_arr[both] - b_arr[both], int((~both).sum())


def paired_bootstrap_ci(
    a: ArrayLike, b: ArrayLike, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> MeanCI:
    """Mean of the paired differences a - b and its percentile-bootstrap CI (pairs resampled together).

    `a[i]` and `b[i]` must belong to the same example; pairs with either side NaN are dropped and counted
    in `n_missing`.
    """
    diffs, n_missing = _paired_differences(a, b)
    ci = _mean_ci(diffs, n_boot, level, seed)
    return MeanCI(ci.mean, ci.lo, ci.hi, ci.n, n_missing, level)


def _sign_flip_pvalue(diffs: np.ndarray, n_perm: int, seed: int, exact_max_n: int) -> float:
    n = len(diffs)
    if n == 1:
        # Both sign patterns of one difference are as extreme as it (and scipy needs two observations).
        return 1.0
    if n <= exact_max_n:
        # One sample under "samples" is scipy's sign flip; n_resamples=inf enumerates all 2**n patterns.
        # The sign-flip null is symmetric, so its two-sided p (twice the smaller tail) is P(|mean| >= observed).
        res = stats.permutation_test(
            (diffs,),
            np.mean,
            permutation_type="samples",
            n_resamples=np.inf,
            batch=max(1, _MAX_DRAWS_PER_CHUNK // n),
            vectorized=True,
            alternative="two-sided",
        )
        return float(res.pvalue)
    observed = abs(diffs.sum())
    # Flipped sums equal to the observed one must count as "as extreme" despite float rounding.
    threshold = observed - 1e-9 * max(1.0, observed)
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    for start in range(0, n_perm, chunk):
        signs = rng.choice((-1.0, 1.0), size=(min(chunk, n_perm - start), n))
        hits += int(np.count_nonzero(np.abs(signs @ diffs) >= threshold))
    # The +1 counts the observed labelling itself, so a Monte Carlo p-value is never 0.
    return (hits + 1) / (n_perm + 1)


def paired_permutation_pvalue(
    a: ArrayLike, b: ArrayLike, n_perm: int = 10_000, seed: int = 0, exact_max_n: int = 16
) -> float:
    """Two-sided sign-flip permutation p-value for mean(a - b) = 0 over complete pairs.

    Under the null each pair's difference is equally likely to have either sign; the p-value is the share
    of sign assignments whose |mean difference| is at least the observed one. With at most `exact_max_n`
    complete pairs all 2**n assignments are enumerated (exact, by `scipy.stats.permutation_test`); otherwise
    `n_perm` random assignments are drawn (seeded) and p = (hits + 1) / (n_perm + 1). NaN when no complete
    pair exists; 1 for a single pair.
    """
    _check_resampling(n_perm)
    diffs, _ = _paired_differences(a, b)
    if len(diffs) == 0:
        return float("nan")
    return _sign_flip_pvalue(diffs, n_perm, seed, exact_max_n)


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    The k-th smallest of m p-values is multiplied by (m - k + 1), a running maximum keeps the adjusted
    values monotone in the raw ones, and everything is capped at 1. NaN entries stay NaN and do not count
    towards m. Reject H0_i at family-wise level alpha iff adjusted_i <= alpha.
    """
    p = _to_float(pvalues)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    out = np.full(p.shape, np.nan)
    present = ~np.isnan(p)
    vals = p[present]
    order = np.argsort(vals, kind="stable")
    scaled = (len(vals) - np.arange(len(vals))) * vals[order]
    adjusted = np.empty(len(vals))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    out[present] = adjusted
    return out


def _require_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"table lacks column(s) {missing}; it has {list(df.columns)}")


def _scores(df: pd.DataFrame, score_col: str) -> pd.Series:
    """The score column as float64 with NaN for missing; non-numeric text raises instead of becoming NaN."""
    return pd.Series(df[score_col].to_numpy(dtype=float, na_value=np.nan), index=df.index)


def _unit_scores(df: pd.DataFrame, score_col: str) -> pd.Series:
    """One score per resampling unit: the per-example mean over samples when `example_id` exists."""
    scores = _scores(df, score_col)
    if "example_id" not in df.columns:
        return scores.reset_index(drop=True)
    return scores.groupby(df["example_id"], sort=False).mean()


def _ordered_variants(df: pd.DataFrame) -> list:
    return list(pd.unique(df["variant"]))


def summarize_variants(
    long_df: pd.DataFrame, score_col: str, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Per `variant` (in order of first appearance): n, n_missing, n_examples, mean, ci_lo, ci_hi.

    `n` / `n_missing` count rows with / without a score. The mean is over examples (samples of an example
    averaged first, so every example weighs the same) and the CI resamples examples; with one sample per
    example this is the plain row mean.
    """
    _require_columns(long_df, ["variant", score_col])
    rows = []
    for variant in _ordered_variants(long_df):
        group = long_df[long_df["variant"] == variant]
        n_scored = int(_scores(group, score_col).notna().sum())
        ci = _mean_ci(_unit_scores(group, score_col).to_numpy(), n_boot, level, seed)
        rows.append(
            {
                "variant": variant,
                "n": n_scored,
                "n_missing": len(group) - n_scored,
                "n_examples": ci.n,
                "mean": ci.mean,
                "ci_lo": ci.lo,
                "ci_hi": ci.hi,
            }
        )
    return pd.DataFrame(rows)


def _per_example_table(long_df: pd.DataFrame, score_col: str) -> pd.DataFrame:
    """example_id x variant table of per-example mean scores (samples averaged, NaN where none scored)."""
    _require_columns(long_df, ["variant", "example_id", score_col])
    scores = _scores(long_df, score_col)
    means = scores.groupby([long_df["variant"], long_df["example_id"]], sort=False).mean()
    return means.unstack("variant").reindex(columns=_ordered_variants(long_df))


def _verdict(diff: float, significant: bool, baseline: str) -> str:
    if not significant:
        return f"tied with {baseline}"
    return "better" if diff > 0 else "worse"


def _compare_pair(
    table: pd.DataFrame, variant: str, baseline: str, n_boot: int, n_perm: int, level: float, seed: int
) -> dict:
    a, b = table[variant].to_numpy(), table[baseline].to_numpy()
    ci = paired_bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed)
    both = ~(np.isnan(a) | np.isnan(b))
    return {
        "variant": variant,
        "baseline": baseline,
        "n_pairs": ci.n,
        "n_missing": ci.n_missing,
        "mean": float(a[both].mean()) if ci.n else np.nan,
        "baseline_mean": float(b[both].mean()) if ci.n else np.nan,
        "diff": ci.mean,
        "ci_lo": ci.lo,
        "ci_hi": ci.hi,
        "p_value": paired_permutation_pvalue(a, b, n_perm=n_perm, seed=seed),
    }


def compare_variants(
    long_df: pd.DataFrame,
    score_col: str,
    baseline: str,
    others: Sequence[str] | None = None,
    alpha: float = 0.05,
    n_boot: int = 10_000,
    n_perm: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired comparison of each variant in `others` (default: all but the baseline) against `baseline`.

    Scores are paired on `example_id` (samples averaged per example first). One row per variant with
    `n_pairs` (examples scored for both), `n_missing` (examples dropped because either side lacks a score),
    `mean` and `baseline_mean` over those pairs, `diff` = mean - baseline_mean with a paired bootstrap CI
    (`ci_lo`, `ci_hi`), the sign-flip permutation `p_value`, `p_holm` (Holm across the rows of this table),
    `significant` (p_holm <= alpha) and a `verdict`: "better", "worse", or "tied with <baseline>".
    "Tied" means no difference detectable at `alpha`, not a demonstrated equivalence.
    """
    table = _per_example_table(long_df, score_col)
    if baseline not in table.columns:
        raise KeyError(f"baseline {baseline!r} is not a variant; variants are {list(table.columns)}")
    others = [v for v in table.columns if v != baseline] if others is None else list(others)
    unknown = [v for v in others if v not in table.columns]
    if unknown:
        raise KeyError(f"variant(s) {unknown} not in the table; variants are {list(table.columns)}")
    result = pd.DataFrame([_compare_pair(table, v, baseline, n_boot, n_perm, level, seed) for v in others])
    if result.empty:
        return result
    result["p_holm"] = holm(result["p_value"])
    result["significant"] = result["p_holm"] <= alpha
    result["verdict"] = [
        _verdict(d, s, baseline) for d, s in zip(result["diff"], result["significant"], strict=True)
    ]
    return result


def _sorted_levels(values: pd.Series) -> list:
    levels = list(pd.unique(values.dropna()))
    try:
        return sorted(levels)
    except TypeError:
        return levels


def _two_sample_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int, level: float, seed: int
) -> tuple[float, float, float]:
    """mean(a) - mean(b) with a CI from resampling each group on its own (no pairing available)."""
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) == 0 or len(b) == 0:
        return np.nan, np.nan, np.nan
    diff = float(a.mean() - b.mean())
    # scipy refuses to resample a group of one value, whose resampled mean is that value: hold it fixed.
    if len(a) == 1 and len(b) == 1:
        lo, hi = diff, diff
    elif len(a) == 1:
        lo, hi = _percentile_ci((b,), lambda y, axis: a[0] - np.mean(y, axis=axis), n_boot, level, seed)
    elif len(b) == 1:
        lo, hi = _percentile_ci((a,), lambda x, axis: np.mean(x, axis=axis) - b[0], n_boot, level, seed)
    else:
        lo, hi = _percentile_ci((a, b), _diff_of_means, n_boot, level, seed)
    return diff, lo, hi


def _level_difference(
    df: pd.DataFrame, factor: str, level: object, ref: object, score_col: str, boot: tuple[int, float, int]
) -> tuple[float, float, float]:
    """Difference of mean score at `level` minus at `ref`: paired on examples when the table has them."""
    n_boot, conf, seed = boot
    at_level, at_ref = df[df[factor] == level], df[df[factor] == ref]
    if "example_id" not in df.columns:
        a, b = _scores(at_level, score_col).to_numpy(), _scores(at_ref, score_col).to_numpy()
        return _two_sample_bootstrap_ci(a, b, n_boot, conf, seed)
    paired = pd.concat(
        {"level": _unit_scores(at_level, score_col), "ref": _unit_scores(at_ref, score_col)}, axis=1
    )
    ci = paired_bootstrap_ci(paired["level"], paired["ref"], n_boot=n_boot, level=conf, seed=seed)
    return ci.mean, ci.lo, ci.hi


def _factor_rows(df: pd.DataFrame, factor: str, score_col: str, boot: tuple[int, float, int]) -> list[dict]:
    n_boot, conf, seed = boot
    levels = _sorted_levels(df[factor])
    rows = []
    for level in levels:
        at_level = df[df[factor] == level]
        n_scored = int(_scores(at_level, score_col).notna().sum())
        ci = _mean_ci(_unit_scores(at_level, score_col).to_numpy(), n_boot, conf, seed)
        is_ref = level == levels[0]
        diff = (np.nan,) * 3 if is_ref else _level_difference(df, factor, level, levels[0], score_col, boot)
        rows.append(
            {
                "factor": factor,
                "level": level,
                "n": n_scored,
                "n_missing": len(at_level) - n_scored,
                "mean": ci.mean,
                "ci_lo": ci.lo,
                "ci_hi": ci.hi,
                "vs_level": None if is_ref else levels[0],
                "diff": diff[0],
                "diff_ci_lo": diff[1],
                "diff_ci_hi": diff[2],
            }
        )
    return rows


def main_effects(
    df: pd.DataFrame,
    factor_cols: Sequence[str],
    score_col: str,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean score at each level of each grid factor, and each level's difference from the lowest level.

    One row per (factor, level), levels sorted: `n`, `n_missing`, `mean` with a bootstrap CI, and for every
    level but the lowest `diff` = mean(level) - mean(lowest level) with `diff_ci_lo`/`diff_ci_hi`. For a
    2-level factor the single `diff` row is the main effect (e.g. dropout 0.10 vs 0.05). Rows at a level are
    pooled over the other factors, which is the main effect for a balanced full grid; an unbalanced grid
    confounds factors. With `example_id` present the difference is paired on examples (each example's mean
    at one level minus at the other) and examples are resampled; without it (e.g. a trial table) the two
    levels are resampled independently.
    """
    _require_columns(df, [*factor_cols, score_col])
    boot = (n_boot, level, seed)
    rows = [row for factor in factor_cols for row in _factor_rows(df, factor, score_col, boot)]
    return pd.DataFrame(rows)
