"""Tests for analysis.stats (hand cases, scipy cross-checks) and analysis.seed_outputs on the study's CSV."""

from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis.seed_outputs import (
    PUBLISHED_TABLE,
    load_wide_scores,
    parse_score,
    read_wide_scores,
    study_notes,
    study_table,
)
from analysis.stats import (
    bootstrap_mean_ci,
    compare_variants,
    holm,
    main_effects,
    paired_bootstrap_ci,
    paired_permutation_pvalue,
    summarize_variants,
)

# The study's published table of mean scores (shared/data/README.md); its DPO column is SFTe_DPO2.
PUBLISHED_MEANS = {
    "Base": 41.34,
    "SFT1": 42.97,
    "SFT2": 40.67,
    "SFT3": 38.24,
    "SFT4": 36.91,
    "SFTe": 43.62,
    "SFTe_DPO2": 41.35,
}
# SFT1-4 grid from the README: LoRA alpha 16/8/16/8, dropout 0.05/0.05/0.10/0.10.
SFT_GRID = pd.DataFrame(
    {
        "variant": ["SFT1", "SFT2", "SFT3", "SFT4"],
        "alpha": [16, 8, 16, 8],
        "dropout": [0.05, 0.05, 0.10, 0.10],
    }
)


def _paired_mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


# --- bootstrap_mean_ci -------------------------------------------------------------------------------


def test_bootstrap_drops_nan_and_counts_it() -> None:
    ci = bootstrap_mean_ci([1.0, 2.0, 3.0, np.nan, None])
    assert (ci.n, ci.n_missing) == (3, 2)
    assert ci.mean == pytest.approx(2.0)
    assert 1.0 <= ci.lo <= ci.mean <= ci.hi <= 3.0
    mean, lo, hi = ci
    assert (mean, lo, hi) == (ci.mean, ci.lo, ci.hi)


def test_bootstrap_constant_and_empty() -> None:
    assert tuple(bootstrap_mean_ci([7.0] * 5)) == (7.0, 7.0, 7.0)
    empty = bootstrap_mean_ci([np.nan, np.nan])
    assert empty.n == 0 and empty.n_missing == 2 and np.isnan(empty.mean) and np.isnan(empty.lo)


def test_bootstrap_is_seeded() -> None:
    x = np.random.default_rng(1).normal(size=40)
    assert bootstrap_mean_ci(x, seed=3) == bootstrap_mean_ci(x, seed=3)
    assert bootstrap_mean_ci(x, seed=3) != bootstrap_mean_ci(x, seed=4)


def test_bootstrap_matches_scipy_percentile_loosely() -> None:
    x = np.random.default_rng(2).exponential(scale=10.0, size=60)
    ours = bootstrap_mean_ci(x, n_boot=20_000, level=0.9)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20_000, confidence_level=0.9, method="percentile", rng=5)
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert ours.lo == pytest.approx(ref.confidence_interval.low, abs=0.1 * se)
    assert ours.hi == pytest.approx(ref.confidence_interval.high, abs=0.1 * se)
    assert ours.lo < x.mean() < ours.hi


# --- paired tests ------------------------------------------------------------------------------------


def test_paired_bootstrap_uses_complete_pairs_only() -> None:
    ci = paired_bootstrap_ci([1.0, 2.0, 3.0, np.nan, 9.0], [0.0, 1.0, 1.0, 5.0, np.nan])
    assert (ci.n, ci.n_missing) == (3, 2)
    assert ci.mean == pytest.approx(4 / 3)
    assert ci.lo <= ci.mean <= ci.hi
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_permutation_hand_cases() -> None:
    # Three +1 differences: of 8 sign patterns only all-plus and all-minus reach |sum| = 3.
    assert paired_permutation_pvalue([1, 1, 1], [0, 0, 0]) == pytest.approx(2 / 8)
    assert paired_permutation_pvalue([2, 3, 4], [2, 3, 4]) == 1.0
    assert np.isnan(paired_permutation_pvalue([np.nan], [1.0]))


@pytest.mark.parametrize("n", [5, 11, 16])
def test_exact_permutation_matches_scipy(n: int) -> None:
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.3, 1.0, n), rng.normal(0.0, 1.0, n)
    ref = sps.permutation_test(
        (a, b), _paired_mean_diff, permutation_type="samples", n_resamples=np.inf, vectorized=True
    )
    assert paired_permutation_pvalue(a, b) == pytest.approx(ref.pvalue, rel=1e-9)


def test_monte_carlo_permutation_matches_scipy_loosely() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.25, 1.0, 60), rng.normal(0.0, 1.0, 60)
    ours = paired_permutation_pvalue(a, b, n_perm=20_000)
    ref = sps.permutation_test(
        (a, b), _paired_mean_diff, permutation_type="samples", n_resamples=20_000, vectorized=True, rng=1
    )
    assert ours == pytest.approx(ref.pvalue, abs=0.015)


def test_monte_carlo_pvalue_is_never_zero() -> None:
    ones = np.ones(40)
    assert paired_permutation_pvalue(ones, np.zeros(40), n_perm=999) == pytest.approx(1 / 1000)


# --- holm --------------------------------------------------------------------------------------------


def test_holm_hand_example() -> None:
    # Sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max keeps 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.01, np.nan, 0.02]) == pytest.approx([0.02, np.nan, 0.02], nan_ok=True)
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError):
        holm([1.5])


def test_holm_is_monotone_and_dominates_raw() -> None:
    p = np.random.default_rng(0).uniform(0, 0.2, 12)
    adjusted = holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0)
    assert np.all(adjusted >= p) and np.all(adjusted <= 1)


# --- table-level functions ---------------------------------------------------------------------------


def _synthetic_long(n_examples: int = 40, n_samples: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(20, 80, n_examples)
    rows = []
    for variant, shift in [("base", 0.0), ("same", 0.0), ("good", 15.0), ("bad", -15.0)]:
        for ex in range(n_examples):
            for s in range(n_samples):
                rows.append((variant, ex, s, difficulty[ex] + shift + rng.normal(0, 3)))
    return pd.DataFrame(rows, columns=["variant", "example_id", "sample", "score"])


def test_summarize_variants_counts_missing_and_averages_samples() -> None:
    df = pd.DataFrame(
        {
            "variant": ["x", "x", "x", "x", "y"],
            "example_id": [0, 0, 1, 2, 0],
            "sample": [0, 1, 0, 0, 0],
            "score": [10.0, 30.0, 50.0, np.nan, 5.0],
        }
    )
    out = summarize_variants(df, "score").set_index("variant")
    assert out.loc["x", ["n", "n_missing", "n_examples"]].tolist() == [3, 1, 2]
    assert out.loc["x", "mean"] == pytest.approx(35.0)  # mean of example means 20 and 50
    assert out.loc["x", "ci_lo"] <= 35.0 <= out.loc["x", "ci_hi"]
    assert list(out.index) == ["x", "y"]


def test_compare_variants_detects_shifts_and_ties() -> None:
    df = _synthetic_long()
    df.loc[(df["variant"] == "good") & (df["example_id"] == 3), "score"] = np.nan
    out = compare_variants(df, "score", baseline="base").set_index("variant")
    assert list(out.index) == ["same", "good", "bad"]
    assert out.loc["good", "verdict"] == "better" and out.loc["bad", "verdict"] == "worse"
    assert out.loc["same", "verdict"] == "tied with base" and not out.loc["same", "significant"]
    assert out.loc["good", "n_pairs"] == 39 and out.loc["good", "n_missing"] == 1
    assert out.loc["bad", "n_pairs"] == 40
    assert out.loc["good", "diff"] == pytest.approx(
        out.loc["good", "mean"] - out.loc["good", "baseline_mean"]
    )
    assert (out["ci_lo"] <= out["diff"]).all() and (out["diff"] <= out["ci_hi"]).all()
    assert out["p_holm"].tolist() == pytest.approx(holm(out["p_value"]).tolist())
    only_good = compare_variants(df, "score", baseline="base", others=["good"])
    assert only_good["variant"].tolist() == ["good"]
    with pytest.raises(KeyError):
        compare_variants(df, "score", baseline="nope")


def test_main_effects_paired_and_unpaired() -> None:
    grid = pd.DataFrame(
        {"variant": ["a", "b", "c", "d"], "dropout": [0.05, 0.05, 0.1, 0.1], "r": [8, 16, 8, 16]}
    )
    shift = {"a": 0.0, "b": 2.0, "c": -10.0, "d": -8.0}
    df = _synthetic_long(n_samples=1)
    df = df[df["variant"] == "base"].drop(columns="variant").merge(grid, how="cross")
    df["score"] += df["variant"].map(shift)
    out = main_effects(df, ["dropout", "r"], "score")
    high = out[(out["factor"] == "dropout") & (out["level"] == 0.1)].iloc[0]
    assert high["vs_level"] == 0.05 and high["diff"] == pytest.approx(-10.0)
    assert high["diff_ci_lo"] <= -10.0 <= high["diff_ci_hi"] and high["diff_ci_hi"] < 0
    assert out[(out["factor"] == "r") & (out["level"] == 16)].iloc[0]["diff"] == pytest.approx(2.0)
    assert out.groupby("factor")["diff"].apply(lambda s: s.isna().sum()).tolist() == [1, 1]
    trials = pd.DataFrame({"dropout": [0.05, 0.05, 0.1, 0.1], "eval_loss": [1.0, 1.2, 1.5, 1.7]})
    unpaired = main_effects(trials, ["dropout"], "eval_loss").iloc[1]
    assert unpaired["diff"] == pytest.approx(0.5) and unpaired["diff_ci_lo"] <= 0.5 <= unpaired["diff_ci_hi"]


# --- seed outputs importer ---------------------------------------------------------------------------


def _seed_csv(shared_data: Path) -> Path:
    return shared_data / "seed_outputs" / "evaluation_results_with_scores.csv"


def test_seed_table_shape(shared_data: Path) -> None:
    seed = read_wide_scores(_seed_csv(shared_data))
    long = seed.long
    assert seed.n_footer_rows == 2
    assert list(long["variant"].unique()) == list(PUBLISHED_MEANS)
    assert long.groupby("variant").size().eq(178).all()
    assert sorted(long["example_id"].unique()) == list(range(178))
    assert (long["sample"] == 0).all() and (long["system_prompt"] == "").all()
    assert long["answer_tokens"].isna().all() and long["latency_s"].isna().all()
    assert long["critic/score"].dtype == np.float64 and long["critic/score"].between(0, 100).all()
    assert not long["question"].str.contains("USER:|ASSISTANT:").any()
    assert long["critic/raw"].str.fullmatch(r"\d+").all()


# Each model's exact mean over the 178 prompts: sum of its integer scores / 178.
EXACT_SUMS = {
    "Base": 7360,
    "SFT1": 7650,
    "SFT2": 7240,
    "SFT3": 6808,
    "SFT4": 6570,
    "SFTe": 7765,
    "SFTe_DPO2": 7360,
}


def test_seed_means_reproduce_the_footer_exactly(shared_data: Path) -> None:
    # The footer holds each mean to 8 decimals (41.34831461 for 41.348314606...), so it can be matched at
    # most to 5e-9 as a float (|mean - footer| reaches 4.4e-9 for SFTe): it is compared exactly instead,
    # as the exact mean rounded to the footer's 8 decimals.
    seed = read_wide_scores(_seed_csv(shared_data))
    summary = summarize_variants(seed.long, "critic/score").set_index("variant")
    for model, total in EXACT_SUMS.items():
        raw = seed.long.loc[seed.long["variant"] == model, "critic/raw"]
        exact = Fraction(sum(int(x) for x in raw), len(raw))
        assert len(raw) == 178 and exact == Fraction(total, 178)
        assert summary.loc[model, "mean"] == pytest.approx(float(exact), abs=1e-12)
        assert round(exact, 8) == Fraction(repr(float(seed.published_means[model])))
        assert abs(summary.loc[model, "mean"] - seed.published_means[model]) <= 5e-9
        assert summary.loc[model, "ci_lo"] < summary.loc[model, "mean"] < summary.loc[model, "ci_hi"]


def test_seed_published_table_truncates_or_rounds(shared_data: Path) -> None:
    assert {m: float(v) for m, v in PUBLISHED_TABLE.items()} == PUBLISHED_MEANS
    table = study_table(read_wide_scores(_seed_csv(shared_data))).set_index("model")
    assert table["exact"].to_dict() == {m: f"{t}/178" for m, t in EXACT_SUMS.items()}
    assert table["footer_is_exact_8dp"].all() and (table["published"] == pd.Series(PUBLISHED_MEANS)).all()
    assert table["published_is"].to_dict() == {
        "Base": "truncated",  # 41.3483 -> 41.34; rounding gives 41.35
        "SFT1": "truncated",  # 42.9775 -> 42.97; rounding gives 42.98
        "SFT2": "truncated = rounded",  # 40.6742
        "SFT3": "truncated",  # 38.2472 -> 38.24; rounding gives 38.25
        "SFT4": "truncated = rounded",  # 36.9101
        "SFTe": "truncated = rounded",  # 43.6236
        "SFTe_DPO2": "rounded",  # 41.3483 -> 41.35, the same mean as Base's 41.34
    }
    notes = study_notes(table.reset_index())
    assert any(n.startswith("Base and SFTe_DPO2 have exactly the same mean (7360/178 = ") for n in notes)


def test_seed_no_variant_differs_from_base(shared_data: Path) -> None:
    out = compare_variants(load_wide_scores(_seed_csv(shared_data)), "critic/score", baseline="Base")
    assert len(out) == 6 and (out["n_pairs"] == 178).all()
    assert not out["significant"].any()
    assert (out["verdict"] == "tied with Base").all()
    assert (out["p_value"] > 0.05).all()


def test_seed_dropout_main_effect(shared_data: Path) -> None:
    long = load_wide_scores(_seed_csv(shared_data)).merge(SFT_GRID, on="variant")
    out = main_effects(long, ["dropout", "alpha"], "critic/score").set_index(["factor", "level"])
    expected = (38.247191 + 36.910112) / 2 - (42.977528 + 40.674157) / 2
    assert out.loc[("dropout", 0.10), "diff"] == pytest.approx(expected, abs=1e-5)
    assert out.loc[("dropout", 0.10), "n"] == 356


def _write_wide(path: Path, footer: list[str]) -> Path:
    header = "i,prompt,target,clean_A,score_A"
    rows = ['0,"USER: \nq0?\nASSISTANT: ",t0,a0,80', '1,"USER: \nq1?\nASSISTANT: ",t1,,n/a']
    path.write_text("\n".join([header, *rows, *footer]) + "\n")
    return path


def test_importer_footer_and_missing_scores(tmp_path: Path) -> None:
    seed = read_wide_scores(_write_wide(tmp_path / "ok.csv", [",,,,", ",,,,40"]))
    assert seed.published_means.to_dict() == {"A": 40.0}
    assert seed.long["critic/score"].tolist() == pytest.approx([80.0, np.nan], nan_ok=True)
    assert seed.long["critic/raw"].tolist() == ["80", "n/a"]
    assert seed.long["question"].tolist() == ["q0?", "q1?"] and seed.long["answer"].tolist() == ["a0", ""]


@pytest.mark.parametrize(
    "footer, message",
    [
        ([], "no footer"),
        ([",,,,", ",,,,", ",,,,40"], "integer `i`"),
        ([",,,,40"], "all-empty row"),
        ([",,,,", ",,,mean,40"], "outside the score_ columns"),
        ([",,,,", ",,,,forty"], "not numeric"),
    ],
)
def test_importer_rejects_unexpected_footer(tmp_path: Path, footer: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_wide_scores(_write_wide(tmp_path / "bad.csv", footer))


def test_parse_score_never_invents_zero() -> None:
    assert parse_score("85") == 85.0 and parse_score("0") == 0.0
    for text in ["", "n/a", "101", "-1", None]:
        assert np.isnan(parse_score(text))
