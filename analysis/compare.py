"""Several runs side by side: does post-training help each model over its own base?

The study's open question (would a stronger model behave the same?) is a comparison across runs: each run
(one model, one config) is judged against its own base, on its own test set, and the gains sit side by side.
Each row pairs the run's variant with that run's base on the examples both scored: the best SFT trial
(chosen by validation loss, as the report chooses it), the soup and each DPO round, with the paired bootstrap
interval and the sign-flip p-value Holm-adjusted within the run.

    python -m analysis.compare runs/llava15-7b runs/qwen25-vl --out runs/compare
    from analysis.compare import load_runs, gains
    evaluation = load_runs(["runs/a", "runs/b"])      # every run's eval rows, with `run` and `model`
    table = gains(["runs/a", "runs/b"])                # one row per (run, stage) against that run's base

Pandas and scipy only (through ``analysis.stats``); no Ray, no torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.report import _md, best_trial_by_validation
from analysis.run import RunTables, load_run
from analysis.stats import compare_variants
from vlm_posttrain.store import RunStore

SCORE = "reference/score"
BASE = "base"


def model_of(run: RunTables) -> str:
    """The base model the run's eval stage loaded: a hub id or folder as given, root-relative when inside."""
    manifests = run.manifests
    if not len(manifests) or "eval" not in set(manifests["stage"]):
        return "unknown"
    location = manifests[manifests["stage"] == "eval"].iloc[-1]["path"]
    model = RunStore(run.root).read_manifest(location).get("inputs", {}).get("model", "unknown")
    return model[len(run.root) + 1 :] if model.startswith(run.root + "/") else model


def family_of(run: RunTables, model: str) -> str:
    """The model's family (``vlm_posttrain.families``): from its folder's config.json, a run's tiny model
    inside the root, or a published checkpoint's id; "unknown" where none tells."""
    from vlm_posttrain import families

    root = Path(run.root)
    folder = root / model if not Path(model).is_absolute() and (root / model).is_dir() else Path(model)
    try:
        return families.detect(str(folder) if folder.is_dir() else model).name
    except ValueError:
        return "unknown"


def _named(roots: Sequence[str | Path]) -> list[tuple[str, RunTables]]:
    names = [Path(r).name for r in roots]
    if len(set(names)) < len(names):
        raise ValueError(f"run roots {list(map(str, roots))}: two share a folder name; give each its own")
    return [(name, load_run(r)) for name, r in zip(names, roots, strict=True)]


def load_runs(roots: Sequence[str | Path]) -> pd.DataFrame:
    """Every run's eval rows in one DataFrame, with ``run`` (the root's folder name) and ``model`` columns."""
    frames = []
    for name, run in _named(roots):
        if run.eval is None:
            raise ValueError(f"run root '{run.root}': no complete eval artifact; run the eval stage first")
        frames.append(run.eval.assign(run=name, model=model_of(run)))
    return pd.concat(frames, ignore_index=True)


def _stages(run: RunTables) -> dict[str, str]:
    """Stage -> the variant that stands for it: the best SFT trial by validation loss, the soup, each round."""
    variants = [str(v) for v in pd.unique(run.eval["variant"])]
    chosen = {}
    best = best_trial_by_validation(run.trials, variants).variant
    if best:
        chosen["sft (best by val loss)"] = best
    chosen.update({v.split("/")[0]: v for v in variants if v.startswith("soup/")})
    chosen.update({v: v for v in variants if v.startswith("dpo/")})
    return chosen


def gains(roots: Sequence[str | Path], score_col: str = SCORE, seed: int = 0) -> pd.DataFrame:
    """One row per (run, stage): the stage's paired difference against the run's own base."""
    rows = []
    for name, run in _named(roots):
        if run.eval is None or score_col not in run.eval:
            raise ValueError(
                f"run root '{run.root}': no eval table with {score_col}; run the eval stage first"
            )
        stages, model = _stages(run), model_of(run)
        family = family_of(run, model)
        table = compare_variants(run.eval, score_col, baseline=BASE, others=list(stages.values()), seed=seed)
        by_variant = table.set_index("variant")
        for stage, variant in stages.items():
            r = by_variant.loc[variant]
            rows.append(
                {
                    "run": name,
                    "model": model,
                    "family": family,
                    "stage": stage,
                    "variant": variant,
                    "n_pairs": int(r["n_pairs"]),
                    "base_mean": r["baseline_mean"],
                    "mean": r["mean"],
                    "diff": r["diff"],
                    "ci_lo": r["ci_lo"],
                    "ci_hi": r["ci_hi"],
                    "p_holm": r["p_holm"],
                    "verdict": r["verdict"],
                }
            )
    return pd.DataFrame(rows)


def write_comparison(roots: Sequence[str | Path], out: str | Path, score_col: str = SCORE) -> Path:
    """``comparison.md`` plus the table as CSV and parquet; returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = gains(roots, score_col)
    table.to_parquet(out / "comparison.parquet", index=False)
    table.to_csv(out / "comparison.csv", index=False)
    lines = [
        "# Post-training gains, run by run",
        "",
        f"Each row: the variant's mean {score_col} minus its own run's base on the examples both scored; paired "
        "bootstrap 95% interval, sign-flip p-value Holm-adjusted within the run.",
        "",
        _md(table, ".4g"),
        "",
    ]
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="run roots (each with a finished eval stage)")
    parser.add_argument("--out", required=True, help="folder for comparison.md, .csv and .parquet")
    parser.add_argument("--score", default=SCORE, help=f"score column (default {SCORE})")
    args = parser.parse_args(argv)
    print(write_comparison(args.roots, args.out, args.score))


if __name__ == "__main__":
    main()
