"""The report: written from a small fake run and from the study's real scores; every linked file exists."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from analysis.report import write_report
from analysis.run import load_run
from analysis.seed_outputs import load_wide_scores


def _artifact(root, stage, key, files: dict[str, pd.DataFrame]):
    folder = root / stage / f"{stage}-{key}"
    folder.mkdir(parents=True)
    for name, df in files.items():
        df.to_parquet(folder / name, index=False)
    manifest = {
        "stage": stage,
        "artifact": f"{stage}-{key}",
        "status": "complete",
        "created": "2026-11-27T10:00",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _fake_run(root, evaluation):
    trials = pd.DataFrame(
        {
            "trial_id": ["t0", "t1"],
            "config/lora_alpha": [16, 8],
            "train_loss": [0.9, 1.0],
            "eval_loss": [1.1, 1.2],
        }
    )
    curves = pd.DataFrame(
        {
            "trial_id": ["t0", "t0", "t1", "t1"],
            "step": [1, 2, 1, 2],
            "epoch": [0.5, 1.0, 0.5, 1.0],
            "train_loss": [1.5, 0.9, 1.6, 1.0],
            "eval_loss": [np.nan, 1.1, np.nan, 1.2],
        }
    )
    _artifact(root, "sft", "a", {"trials.parquet": trials, "curves.parquet": curves})
    _artifact(root, "eval", "b", {"evaluation.parquet": evaluation})
    # A half-written artifact (no manifest) is never read.
    (root / "eval" / "eval-zzz").mkdir()
    (root / "eval" / "eval-zzz" / "evaluation.parquet").write_bytes(b"garbage")


def _linked_files_exist(report):
    text = report.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    for link in links:
        assert (report.parent / link).is_file(), link
    return text


def test_report_from_fake_run(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for variant, shift in [("base", 0), ("sft/t0", 30), ("sft/t1", 1)]:
        for i in range(40):
            score = 40 + shift + rng.normal(0, 5)
            rows.append(
                {
                    "variant": variant,
                    "example_id": f"e{i}",
                    "sample": 0,
                    "reference/score": score,
                    "critic/score": score + rng.normal(0, 1) if i % 10 else float("nan"),
                }
            )
    _fake_run(tmp_path / "run", pd.DataFrame(rows))
    run = load_run(tmp_path / "run")
    assert (
        len(run.trials) == 2
        and len(run.evaluation) == 120
        and list(run.manifests["stage"]) == ["eval", "sft"]
    )
    report = write_report(run, tmp_path / "out")
    text = _linked_files_exist(report)
    assert "loss_curves.png" in text and "Paired differences against base" in text
    assert "Paired differences against sft/t0" in text
    comparison = pd.read_csv(tmp_path / "out" / "compare_reference_vs_base.csv")
    assert comparison.set_index("variant").loc["sft/t0", "verdict"] == "better"
    # Trial t0 (alpha 16) scores ~29 above t1 (alpha 8): the grid's main effect of alpha says so.
    effects = pd.read_csv(tmp_path / "out" / "grid_effects_reference.csv").dropna(subset=["diff"])
    (alpha,) = effects[effects["factor"] == "config/lora_alpha"].itertuples()
    assert alpha.diff == pytest.approx(29, abs=3) and alpha.diff_ci_lo > 0
    agreement = pd.read_csv(tmp_path / "out" / "judge_agreement.csv")
    assert agreement.loc[0, "n"] == 108 and agreement.loc[0, "spearman"] > 0.9


def test_report_on_the_study_scores(shared_data, tmp_path):
    long = load_wide_scores(shared_data / "seed_outputs" / "evaluation_results_with_scores.csv")
    _fake_run(tmp_path / "run", long)
    report = write_report(load_run(tmp_path / "run"), tmp_path / "out", baseline="Base")
    _linked_files_exist(report)
    comparison = pd.read_csv(tmp_path / "out" / "compare_critic_vs_Base.csv")
    assert len(comparison) == 6 and not comparison["significant"].any()
    summary = pd.read_csv(tmp_path / "out" / "scores_critic.csv").set_index("variant")
    assert abs(summary.loc["SFTe", "mean"] - 43.62) < 0.01
