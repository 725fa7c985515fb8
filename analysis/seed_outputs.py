"""Import the original study's wide score table into the eval stage's long rows (`eval.parquet`'s columns).

Usage::

    from analysis.seed_outputs import load_wide_scores, read_wide_scores

    long_df = load_wide_scores(path)          # one row per (model, prompt)
    seed = read_wide_scores(path)             # .long, .published_means, .n_footer_rows
    table = study_table(seed)                 # exact mean per model vs the footer and the published table
    notes = study_notes(table)                # what the published two-decimal table does (derived, not typed)

The study published `evaluation_results_with_scores.csv`: one row per test prompt (`i`, `prompt`,
`target`, then `clean_<model>` answers and `score_<model>` judge scores), followed by a blank row and a row
holding each model's mean score. The footer is detected explicitly and must look exactly like that (an
all-empty row, then a row whose only non-empty cells are numeric `score_*` cells); anything else raises
`ValueError` rather than being guessed at. The means row is returned as `published_means`, never as data.

Long columns: `variant` (the model name from the column, e.g. `SFTe_DPO2`), `system_prompt` (""),
`example_id` (from `i`), `sample` (0), `question` (the prompt without its `USER:`/`ASSISTANT:` wrapper),
`prompt` (the raw prompt cell), `reference`, `answer`, `answer_tokens` and `latency_s` (not recorded: NA),
`critic/score` (float 0-100, NaN where the cell is empty, not a number or out of range: never 0) and
`critic/raw` (the score cell's text as published).

`study_table` computes each model's mean exactly (a `Fraction`: sum of the score cells / number scored) and
sets it beside the footer (8 decimals: it equals the exact mean rounded to 8 decimals) and the study's
published two-decimal table (`PUBLISHED_TABLE`), saying for each published value whether it is the exact
mean truncated, rounded, or both. On the study's CSV: Base and SFTe_DPO2 both sum to 7360 over 178 prompts
(41.348314...), yet were published as 41.34 (truncated) and 41.35 (rounded); SFT1 42.97 and SFT3 38.24 are
truncations too (42.977..., 38.247...).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

JUDGE = "critic"
# The study's published table of mean scores (shared/data/README.md); its DPO column is SFTe_DPO2.
PUBLISHED_TABLE = {
    "Base": "41.34",
    "SFT1": "42.97",
    "SFT2": "40.67",
    "SFT3": "38.24",
    "SFT4": "36.91",
    "SFTe": "43.62",
    "SFTe_DPO2": "41.35",
}
_ID_COLUMNS = ["i", "prompt", "target"]
# LLaVA-1.5 chat wrapper the study put around each question (the image token was already stripped).
_PROMPT_RE = re.compile(r"^\s*USER:\s*(?P<question>.*?)\s*ASSISTANT:\s*$", re.DOTALL)


@dataclass(frozen=True)
class SeedScores:
    """Parsed table: long rows, the study's published mean per model, and how many footer rows were cut."""

    long: pd.DataFrame
    published_means: pd.Series
    n_footer_rows: int


def _models(columns: list[str]) -> list[str]:
    """Model names that have both a `clean_` and a `score_` column, in the order of the score columns."""
    missing = [c for c in _ID_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"wide score table lacks column(s) {missing}; it has {columns}")
    answers = {c.removeprefix("clean_") for c in columns if c.startswith("clean_")}
    scores = [c.removeprefix("score_") for c in columns if c.startswith("score_")]
    if not scores or set(scores) != answers:
        raise ValueError(f"clean_/score_ columns do not pair up: answers {sorted(answers)}, scores {scores}")
    return scores


def _is_number(text: str) -> bool:
    try:
        return np.isfinite(float(text))
    except ValueError:
        return False


def _check_footer(blank: pd.Series, means: pd.Series, models: list[str]) -> None:
    """The last two rows must be an all-empty row and a means row with numbers only in score_ cells."""
    if (blank.str.strip() != "").any():
        raise ValueError(f"expected an all-empty row before the means row, got {blank.to_dict()}")
    score_cols = [f"score_{m}" for m in models]
    stray = means.drop(score_cols)
    if (stray.str.strip() != "").any():
        raise ValueError(f"means row has text outside the score_ columns: {stray[stray != ''].to_dict()}")
    bad = [c for c in score_cols if not _is_number(means[c])]
    if bad:
        raise ValueError(f"means row is not numeric in {bad}: {means[bad].to_dict()}")


def _split_footer(raw: pd.DataFrame, models: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """Data rows, and the published means per model; raises unless the footer is exactly blank + means."""
    if raw.empty or raw.iloc[-1]["i"].strip():
        last = raw.iloc[-1]["i"] if len(raw) else None
        raise ValueError(
            f"no footer: the last row is data (i={last!r}), expected a blank row and a means row"
        )
    if len(raw) < 3:
        raise ValueError(f"wide score table has {len(raw)} rows; expected data rows, a blank row and means")
    _check_footer(raw.iloc[-2], raw.iloc[-1], models)
    data = raw.iloc[:-2]
    ids = data["i"].str.strip()
    bad_ids = ids[~ids.str.fullmatch(r"\d+")]
    if not bad_ids.empty:
        raise ValueError(f"{len(bad_ids)} data row(s) have no integer `i` (rows {list(bad_ids.index[:5])})")
    if ids.duplicated().any():
        raise ValueError(f"duplicate `i` values: {sorted(set(ids[ids.duplicated()]))[:5]}")
    means = pd.Series({m: float(raw.iloc[-1][f"score_{m}"]) for m in models}, name="published_mean")
    return data, means


def parse_score(text: str) -> float:
    """The judge's 0-100 score from a cell, or NaN when it is empty, not a number, or out of range."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return float("nan")
    return value if 0 <= value <= 100 else float("nan")


def _question(prompt: str) -> str:
    match = _PROMPT_RE.match(prompt)
    return match["question"] if match else prompt.strip()


def _long_rows(data: pd.DataFrame, model: str) -> pd.DataFrame:
    n = len(data)
    raw_scores = data[f"score_{model}"]
    return pd.DataFrame(
        {
            "variant": model,
            "system_prompt": "",
            "example_id": data["i"].astype("int64").to_numpy(),
            "sample": np.zeros(n, dtype="int64"),
            "question": data["prompt"].map(_question).to_numpy(),
            "prompt": data["prompt"].to_numpy(),
            "reference": data["target"].str.strip().to_numpy(),
            "answer": data[f"clean_{model}"].str.strip().to_numpy(),
            "answer_tokens": pd.array([pd.NA] * n, dtype="Int64"),
            "latency_s": np.full(n, np.nan),
            f"{JUDGE}/score": raw_scores.map(parse_score).astype("float64").to_numpy(),
            f"{JUDGE}/raw": raw_scores.to_numpy(),
        }
    )


def read_wide_scores(path: str | Path) -> SeedScores:
    """Parse the study's wide CSV into long evaluation rows plus its published means row."""
    # Read every cell as text with no NA guessing, so empty answers stay "" and the raw score text survives;
    # blank lines are kept so that a footer written as an empty line is seen rather than skipped.
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False).fillna("")
    models = _models(list(raw.columns))
    data, means = _split_footer(raw, models)
    long = pd.concat([_long_rows(data, m) for m in models], ignore_index=True)
    return SeedScores(long=long, published_means=means, n_footer_rows=len(raw) - len(data))


def load_wide_scores(path: str | Path) -> pd.DataFrame:
    """The long evaluation rows of the study's wide CSV (footer dropped); see `read_wide_scores`."""
    return read_wide_scores(path).long


def exact_mean(raw_scores: pd.Series) -> tuple[Fraction, int]:
    """Exact sum of the valid score cells (as `parse_score` accepts them) and how many there are."""
    valid = [text for text in raw_scores if not math.isnan(parse_score(text))]
    return sum((Fraction(text.strip()) for text in valid), Fraction(0)), len(valid)


def _truncate(x: Fraction, places: int) -> Fraction:
    scale = 10**places
    return Fraction(math.floor(x * scale), scale) if x >= 0 else -_truncate(-x, places)


def _round_half_up(x: Fraction, places: int) -> Fraction:
    scale = 10**places
    return Fraction(math.floor(x * scale + Fraction(1, 2)), scale)


def _published_is(published: Fraction, truncated: Fraction, rounded: Fraction) -> str:
    if published == truncated == rounded:
        return "truncated = rounded"
    if published == truncated:
        return "truncated"
    if published == rounded:
        return "rounded"
    return "neither"


def study_table(seed: SeedScores, published: dict[str, str] | None = None) -> pd.DataFrame:
    """Per model: the exact mean of its scores, the CSV footer's mean, and the published two-decimal value.

    Columns: `model`, `n` (scores), `score_sum`, `exact` ("sum/n", unreduced), `mean` (float of the exact
    mean), `footer` (the means row), `footer_is_exact_8dp` (footer == exact mean rounded to 8 decimals),
    `published` (`PUBLISHED_TABLE` by default; NaN for a model it lacks), `truncated` and `rounded` (the
    exact mean cut / rounded half up to the published value's decimals) and `published_is` ("truncated",
    "rounded", "truncated = rounded" where both give it, or "neither"). Every comparison is on fractions.
    """
    published = PUBLISHED_TABLE if published is None else published
    rows = []
    for model, group in seed.long.groupby("variant", sort=False):
        total, n = exact_mean(group[f"{JUDGE}/raw"])
        exact = total / n if n else Fraction(0)
        footer = float(seed.published_means.get(model, math.nan))
        row = {
            "model": model,
            "n": n,
            "score_sum": float(total),
            "exact": f"{total}/{n}",
            "mean": float(exact) if n else math.nan,
            "footer": footer,
            "footer_is_exact_8dp": bool(n)
            and math.isfinite(footer)
            and Fraction(repr(float(footer))) == round(exact, 8),
            "published": math.nan,
            "truncated": math.nan,
            "rounded": math.nan,
            "published_is": "",
        }
        if model in published and n:
            text = published[model]
            places = len(text.partition(".")[2])
            value, truncated, rounded = (
                Fraction(text),
                _truncate(exact, places),
                _round_half_up(exact, places),
            )
            row.update(
                published=float(value),
                truncated=float(truncated),
                rounded=float(rounded),
                published_is=_published_is(value, truncated, rounded),
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _listing(table: pd.DataFrame) -> str:
    return ", ".join(f"{r.model} {r.published:.2f} (exact {r.mean:.4f}...)" for r in table.itertuples())


def study_notes(table: pd.DataFrame) -> list[str]:
    """Sentences on `study_table`'s result, each derived from the numbers (nothing here is typed in)."""
    notes = []
    footer_ok = table["footer_is_exact_8dp"].all()
    notes.append(
        "The CSV's footer row equals every model's exact mean rounded to 8 decimals."
        if footer_ok
        else "The CSV's footer row differs from the exact mean (to 8 decimals) for "
        + ", ".join(table.loc[~table["footer_is_exact_8dp"], "model"])
        + "."
    )
    kinds = {kind: table[table["published_is"] == kind] for kind in ["truncated", "rounded", "neither"]}
    if len(kinds["truncated"]) and len(kinds["rounded"]):
        notes.append(
            "The published two-decimal table is not rounded consistently: it truncates "
            f"{_listing(kinds['truncated'])} but rounds {_listing(kinds['rounded'])}; for the other models "
            "truncating and rounding give the same value."
        )
    elif len(kinds["truncated"]):
        notes.append(
            f"The published two-decimal table truncates rather than rounds: {_listing(kinds['truncated'])}."
        )
    if len(kinds["neither"]):
        notes.append(f"Neither truncation nor rounding gives the published {_listing(kinds['neither'])}.")
    for exact, group in table[table["n"] > 0].groupby("exact", sort=False):
        if len(group) > 1:
            models = " and ".join(group["model"])
            shown = group.dropna(subset=["published"]).sort_values("published")
            how = ", ".join(f"{r.model} {r.published_is}" for r in shown.itertuples())
            artefact = (
                f"; the published {' vs '.join(f'{v:.2f}' for v in shown['published'])} is an artefact of "
                f"rounding ({how}), not a difference"
                if shown["published"].nunique() > 1
                else ""
            )
            notes.append(
                f"{models} have exactly the same mean ({exact} = {group['mean'].iloc[0]:.10f}){artefact}."
            )
    return notes
