"""The soup stage's work as plain functions; ``ray_jobs/soup.py`` runs :func:`soup_payload` as one Ray task.

Reads the SFT artifact's trial table, picks the ingredients (``soup.select``), combines their adapters
(``soup.method``) on the adapter files alone, refuses a soup that fails its numeric self-check, writes one
PEFT adapter folder, and only then loads the base model to score the soup, and each candidate again, on the
val split exactly as the SFT trials were scored (greedy also scores each candidate soup). Runs without Ray:

    report = build_soup(cfg, base_dir, data_dir, sft_dir, out_dir="/tmp/soup/adapter")
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.layout import FILES
from vlm_posttrain.soup.adapters import SoupResult, load_adapter, write_adapter
from vlm_posttrain.soup.check import make_soup
from vlm_posttrain.soup.select import METRIC, select_adapters
from vlm_posttrain.soup.val_loss import ValLoss

TABLE = FILES["sft"]["trials"]


def read_trials(sft_dir: str | Path) -> pd.DataFrame:
    path = Path(sft_dir) / TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{sft_dir} has no {TABLE}; pass the folder of a finished SFT stage artifact")
    return pd.read_parquet(path)


def _soup_scorer(scorer: ValLoss):
    """greedy's evaluate(soup): write the candidate soup to a scratch folder and score it on val."""

    def evaluate(result: SoupResult) -> float:
        with tempfile.TemporaryDirectory(prefix="greedy-") as tmp:
            return scorer(write_adapter(result, Path(tmp) / "adapter", dtype=torch.float32))

    return evaluate


def _recording_warnings(call):
    """Run call(); returns its result and the UserWarnings it raised (for the manifest), shown again as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for message in messages:
        warnings.warn(message, stacklevel=3)
    return result, messages


def _parity(candidates: list[dict]) -> float:
    """Largest gap between a candidate's SFT-time val loss and the scorer's: 0 up to float noise when they agree."""
    gaps = [abs(c["eval_loss_recomputed"] - c[METRIC]) for c in candidates if math.isfinite(c[METRIC])]
    return max(gaps, default=math.nan)


def build_soup(
    cfg: ExperimentConfig,
    base_dir: str | Path,
    data_dir: str | Path,
    sft_dir: str | Path,
    out_dir: str | Path,
) -> dict:
    """Select, soup (``cfg.soup``), self-check and write `out_dir`; returns the facts the manifest records."""
    soup = cfg.soup
    start = time.time()
    sft_dir = Path(sft_dir)
    selection = select_adapters(read_trials(sft_dir), soup.select, soup.top_k, soup.rank_metric)
    trial_of = {str(sft_dir / row["adapter"]): str(row["trial_id"]) for row in selection.rows}
    adapters = [load_adapter(path) for path in trial_of]
    metrics = [float(row[METRIC]) for row in selection.rows]

    def new_scorer() -> ValLoss:
        return ValLoss(cfg, base_dir, data_dir)

    # Only greedy needs the base model before the soup exists; the other methods run on adapter files alone.
    scorer = new_scorer() if soup.method == "greedy" else None
    (path, report), soup_warnings = _recording_warnings(
        lambda: make_soup(
            adapters,
            soup.method,
            out_dir,
            metrics=metrics,
            svd_rank=soup.svd_rank,
            evaluate=_soup_scorer(scorer) if scorer else None,
        )
    )
    built = time.time()
    scorer = scorer or new_scorer()
    soup_loss = scorer(path)
    candidates = [
        {"trial_id": trial_of[str(a.path)], METRIC: m, "eval_loss_recomputed": scorer(a.path)}
        for a, m in zip(adapters, metrics, strict=True)
    ]
    out = {
        "selection": selection.detail,
        "method": soup.method,
        "weights": soup.weights,
        "r": report["r"],
        "lora_alpha": report["lora_alpha"],
        "ingredients": [
            {"trial_id": trial_of[i["path"]], "weight": i["weight"]} for i in report["ingredients"]
        ],
        "candidates": candidates,
        "self_check": report["self_check"],
        "method_metrics": report["metrics"],
        "eval_loss": soup_loss,
        "warnings": soup_warnings,
        # The scorer is the SFT trials' own evaluation: it should reproduce each kept checkpoint's loss.
        "eval_parity_max_abs_diff": _parity(candidates),
        "timings": {"soup_s": built - start, "eval_s": time.time() - built},
    }
    if "greedy_steps" in report:  # each step names its trial instead of its adapter path
        out["greedy_steps"] = [
            {"trial_id": trial_of[s["path"]], **{k: v for k, v in s.items() if k != "path"}}
            for s in report["greedy_steps"]
        ]
    return out


def soup_payload(
    cfg: ExperimentConfig, base_dir: str | Path, data_dir: str | Path, sft_dir: str | Path
) -> dict:
    """build_soup into a scratch folder; the adapter's files come back as bytes (``files``).

    So the task may run on any node of the cluster: the driver writes the files into its own staging folder.
    """
    with tempfile.TemporaryDirectory(prefix="soup-") as tmp:
        adapter = Path(tmp) / "adapter"
        report = build_soup(cfg, base_dir, data_dir, sft_dir, adapter)
        report["files"] = {p.name: p.read_bytes() for p in sorted(adapter.iterdir())}
    return report
