"""Import the original study's wide score table into DESIGN.md's long evaluation-rows format.

Usage::

    from analysis.seed_outputs import load_wide_scores, read_wide_scores

    long_df = load_wide_scores(path)          # one row per (model, prompt)
    seed = read_wide_scores(path)             # .long, .published_means, .n_footer_rows

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

JUDGE = "critic"
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
