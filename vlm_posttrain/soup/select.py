"""Choosing the soup's ingredients from the SFT trial table: ``all``, ``top_k`` or the ``best_rank`` group.

Trials are ranked by their validation metric ``METRIC`` (lower is better); ``best_rank`` groups them by
LoRA rank (``RANK_COLUMN``). Reads the table alone: no adapter files, no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# The trial table's validation metric (loss of the checkpoint each trial kept: lower is better) and rank column.
METRIC = "best_eval_loss"
RANK_COLUMN = "config/lora_r"


@dataclass(frozen=True)
class Selection:
    """The SFT trials chosen as ingredients (best validation metric first) and how they were chosen."""

    rows: list[dict]
    detail: dict


def _require_columns(table: pd.DataFrame, columns: Sequence[str], why: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(
            f"the trial table lacks column(s) {missing} needed {why}; is it an SFT stage's trials.parquet?"
        )


def select_adapters(table: pd.DataFrame, select: str, top_k: int = 1, rank_metric: str = "best") -> Selection:
    """Choose ingredients from the SFT trial table: ``all``, ``top_k`` by METRIC, or the ``best_rank`` group.

    best_rank groups trials by RANK_COLUMN and takes the group whose best (or mean) METRIC is lowest;
    ties go to the smaller rank. Rows come back sorted by METRIC (lowest first, then trial id).
    """
    _require_columns(table, ("trial_id", "adapter", METRIC), "to pick soup ingredients")
    if table.empty:
        raise ValueError("the trial table has no rows: the SFT stage produced no adapters to soup")
    ordered = table.sort_values([METRIC, "trial_id"], na_position="last", kind="stable")
    detail: dict = {"select": select, "metric": METRIC, "lower_is_better": True}
    if select == "all":
        chosen = ordered
    else:
        scored = ordered[ordered[METRIC].notna()]
        if scored.empty:
            raise ValueError(
                f"no trial has a {METRIC}; cannot rank trials (did the SFT grid evaluate on val?)"
            )
        if select == "top_k":
            if top_k > len(scored):
                raise ValueError(
                    f"soup.top_k={top_k} but only {len(scored)} trial(s) have a {METRIC}; lower soup.top_k"
                )
            chosen = scored.head(top_k)
            detail["top_k"] = top_k
        elif select == "best_rank":
            chosen, groups = _best_rank_group(scored, rank_metric)
            detail.update(rank_metric=rank_metric, rank=int(chosen[RANK_COLUMN].iloc[0]), rank_scores=groups)
        else:
            raise ValueError(f"select '{select}': unknown; choose all, top_k or best_rank")
    return Selection(rows=chosen.to_dict("records"), detail=detail)


def _best_rank_group(scored: pd.DataFrame, rank_metric: str) -> tuple[pd.DataFrame, dict]:
    _require_columns(scored, (RANK_COLUMN,), "to group trials by LoRA rank (select: best_rank)")
    if rank_metric not in ("best", "mean"):
        raise ValueError(f"rank_metric '{rank_metric}': unknown; choose best or mean")
    groups = scored.groupby(RANK_COLUMN)[METRIC].agg("min" if rank_metric == "best" else "mean")
    rank = groups.idxmin()  # groupby sorts the ranks, so a tie goes to the smaller one
    return scored[scored[RANK_COLUMN] == rank], {str(int(r)): float(v) for r, v in groups.items()}
