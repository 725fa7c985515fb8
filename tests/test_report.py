"""The report: written from a small fake run and from the study's real scores; every linked file exists.

The best trial (the reference of the second paired comparison) is chosen on validation loss, never on the
test scores it is then compared on; a simulation on the study's scores measures why.
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.report import best_trial_by_validation, write_report
from analysis.run import load_run
from analysis.seed_outputs import load_wide_scores, read_wide_scores
from analysis.stats import compare_variants, holm, paired_permutation_pvalue, summarize_variants


def _artifact(root, stage, key, files: dict[str, pd.DataFrame], metrics: dict | None = None):
    folder = root / stage / f"{stage}-{key}"
    folder.mkdir(parents=True)
    for name, df in files.items():
        df.to_parquet(folder / name, index=False)
    manifest = {
        "stage": stage,
        "artifact": f"{stage}-{key}",
        "status": "complete",
        "created": "2026-11-27T10:00",
        "metrics": metrics or {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _fake_run(root, evaluation, eval_loss=(1.1, 1.2)):
    trials = pd.DataFrame(
        {
            "trial_id": ["t0", "t1"],
            "config/lora_alpha": [16, 8],
            "train_loss": [0.9, 1.0],
            "eval_loss": list(eval_loss),
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
    _artifact(root, "eval", "b", {"eval.parquet": evaluation})
    # A half-written artifact (no manifest) is never read.
    (root / "eval" / "eval-zzz").mkdir()
    (root / "eval" / "eval-zzz" / "eval.parquet").write_bytes(b"garbage")


def _linked_files_exist(report):
    text = report.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    for link in links:
        assert (report.parent / link).is_file(), link
    return text


def _fake_evaluation(shifts=(("base", 0), ("sft/t0", 30), ("sft/t1", 1))) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for variant, shift in shifts:
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
    return pd.DataFrame(rows)


def test_report_from_fake_run(tmp_path):
    _fake_run(tmp_path / "run", _fake_evaluation())
    run = load_run(tmp_path / "run")
    assert len(run.trials) == 2 and len(run.eval) == 120 and list(run.manifests["stage"]) == ["eval", "sft"]
    report = write_report(run, tmp_path / "out")
    text = _linked_files_exist(report)
    assert "loss_curves.png" in text and "Paired differences against base" in text
    assert "Paired differences against sft/t0 (the best trial, chosen by validation loss" in text
    assert "Best trial: **sft/t0**, the SFT trial with the lowest validation loss (`eval_loss` = 1.1" in text
    comparison = pd.read_csv(tmp_path / "out" / "compare_reference_vs_base.csv")
    assert comparison.set_index("variant").loc["sft/t0", "verdict"] == "better"
    # Trial t0 (alpha 16) scores ~29 above t1 (alpha 8): the grid's main effect of alpha says so.
    effects = pd.read_csv(tmp_path / "out" / "grid_effects_reference.csv").dropna(subset=["diff"])
    (alpha,) = effects[effects["factor"] == "config/lora_alpha"].itertuples()
    assert alpha.diff == pytest.approx(29, abs=3) and alpha.diff_ci_lo > 0
    agreement = pd.read_csv(tmp_path / "out" / "judge_agreement.csv")
    assert agreement.loc[0, "n"] == 108 and agreement.loc[0, "spearman"] > 0.9


def _section(text: str, heading: str) -> str:
    """The text of a level-2 section, from its heading to the next level-2 heading."""
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _md_table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows (header -> cell) of the first markdown table after the line `heading`."""
    lines = text[text.index(f"\n{heading}\n") + 1 :].splitlines()[2:]  # past the heading and a blank line
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[: lines.index("")]]
    header, body = rows[0], rows[2:]  # rows[1] is the alignment line
    return [dict(zip(header, row, strict=True)) for row in body]


def test_report_opens_with_a_summary_of_the_evaluation(tmp_path):
    evaluation = _fake_evaluation()
    _fake_run(tmp_path / "run", evaluation)
    text = write_report(load_run(tmp_path / "run"), tmp_path / "out").read_text()
    assert text.splitlines()[2] == "## Summary"  # right after the title line and its blank line
    assert text.index("## Summary") < text.index("## Artifacts") < text.index("## Evaluation")
    summary, evaluated = _section(text, "## Summary"), _section(text, "## Evaluation")
    best = "sft/t0 (best SFT trial by val loss)"
    for score_col in ["reference/score", "critic/score"]:
        rows = {r["variant"]: r for r in _md_table(summary, f"### {score_col}")}
        assert list(rows) == ["base", best, "sft/t1"]  # one row per variant, the best trial marked
        assert rows["base"]["verdict vs base"] == "baseline"
        # The evaluation section's tables for this score column (its means, its paired differences vs base).
        block = evaluated[evaluated.index(f"\n### {score_col}: mean per variant") :]
        means = {r["variant"]: float(r["mean"]) for r in _md_table(block, block.splitlines()[1])}
        heading = (
            "### Paired differences against base (the baseline; bootstrap CI, sign-flip p, Holm-adjusted)"
        )
        vs_base = {r["variant"]: r for r in _md_table(block, heading)}
        stats = summarize_variants(evaluation, score_col).set_index("variant")
        paired = compare_variants(evaluation, score_col, baseline="base").set_index("variant")
        for variant in ["base", "sft/t0", "sft/t1"]:
            row = rows[best if variant == "sft/t0" else variant]
            assert row["mean"] == f"{stats.loc[variant, 'mean']:.1f}"
            assert float(row["mean"]) == pytest.approx(means[variant], abs=0.05 + 1e-9)
            lo, hi = stats.loc[variant, ["ci_lo", "ci_hi"]]
            assert row["95% interval"] == f"{lo:.1f}\u2013{hi:.1f}"
            if variant == "base":
                continue
            assert row["verdict vs base"] == paired.loc[variant, "verdict"] == vs_base[variant]["verdict"]
            diff, lo, hi = paired.loc[variant, ["diff", "ci_lo", "ci_hi"]]
            assert row["difference vs base [95% CI]"] == f"{diff:+.1f} [{lo:.1f}, {hi:.1f}]"
            assert float(vs_base[variant]["diff"]) == pytest.approx(diff, abs=5e-4)
        assert rows[best]["verdict vs base"] == "better"
        assert rows["sft/t1"]["verdict vs base"] == "tied with base"
    assert "n = 40 test examples per variant" in summary  # reference/score: every example scored
    assert "n = 36 test examples per variant" in summary  # critic/score: every tenth example unscored


def test_summary_without_evaluation_says_so_in_one_line(tmp_path):
    curve = pd.DataFrame({"round": [1], "step": [1], "loss": [0.69], "rewards/margins": [0.0]})
    _artifact(tmp_path / "run", "dpo", "d", {"curves.parquet": curve}, {"train_pairs": 3})
    text = write_report(load_run(tmp_path / "run"), tmp_path / "out").read_text()
    summary = _section(text, "## Summary").strip().splitlines()
    assert summary == ["## Summary", "", "No evaluation data in this run: nothing to summarize."]
    assert text.index("## Summary") < text.index("## Artifacts")


def test_best_trial_is_the_lowest_validation_loss_even_with_the_worst_test_score(tmp_path):
    # sft/t1 scores ~29 below sft/t0 on the test split but has the lower validation loss: it is the reference.
    _fake_run(tmp_path / "run", _fake_evaluation(), eval_loss=(1.3, 1.0))
    report = write_report(load_run(tmp_path / "run"), tmp_path / "out")
    text = _linked_files_exist(report)
    assert "Best trial: **sft/t1**, the SFT trial with the lowest validation loss (`eval_loss` = 1 " in text
    assert "Paired differences against sft/t1 (the best trial, chosen by validation loss" in text
    assert "Paired differences against sft/t0" not in text
    assert not list((tmp_path / "out").glob("compare_*_vs_sft_t0.csv"))
    vs_best = pd.read_csv(tmp_path / "out" / "compare_reference_vs_sft_t1.csv").set_index("variant")
    assert (vs_best["baseline"] == "sft/t1").all() and vs_best.loc["sft/t0", "verdict"] == "better"


def test_best_trial_chooser_sees_only_the_trial_table():
    # The chooser's inputs are the trial table and variant names: no evaluation rows, so no test score.
    trials = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "soup/average"],
            "eval_loss": [0.9, 1.0, 0.5, 0.1],  # last epoch's loss; c is not evaluated, the soup is no trial
            "best_eval_loss": [0.8, 0.7, 0.5, 0.1],  # the kept checkpoint's loss: this one decides
        }
    )
    variants = ["base", "sft/a", "sft/b", "soup/average"]
    best = best_trial_by_validation(trials, variants)
    assert best.variant == "sft/b" and "`best_eval_loss` = 0.7 " in best.note
    only_last = best_trial_by_validation(trials.drop(columns="best_eval_loss"), variants)
    assert only_last.variant == "sft/a" and "`eval_loss` = 0.9 " in only_last.note
    tie = best_trial_by_validation(trials.assign(best_eval_loss=0.7), variants)
    assert tie.variant == "sft/a" and "Tied on validation loss: sft/a, sft/b" in tie.note
    partly = best_trial_by_validation(trials.assign(best_eval_loss=[np.nan, 0.7, 0.5, 0.1]), variants)
    assert (
        partly.variant == "sft/b"
        and "Not candidates (no `best_eval_loss` in the trial table): sft/a" in partly.note
    )


@pytest.mark.parametrize(
    "trials, reason",
    [
        (None, "no SFT trial table"),
        (pd.DataFrame({"trial_id": ["a"], "train_loss": [1.0]}), "no validation loss"),
        (
            pd.DataFrame({"trial_id": ["a"], "eval_loss": [np.nan]}),
            "no evaluated SFT trial has a `eval_loss`",
        ),
        (pd.DataFrame({"trial_id": ["z"], "eval_loss": [1.0]}), "no evaluated SFT trial has a `eval_loss`"),
    ],
)
def test_best_trial_without_validation_loss_is_no_comparison(trials, reason):
    best = best_trial_by_validation(trials, ["base", "sft/a"])
    assert best.variant is None
    assert best.note.startswith("No best-trial comparison: ") and reason in best.note
    assert "never by test scores" in best.note


def test_report_without_trial_table_makes_no_best_trial_comparison(tmp_path):
    _artifact(tmp_path / "run", "eval", "b", {"eval.parquet": _fake_evaluation()})
    out = tmp_path / "out"
    text = _linked_files_exist(write_report(load_run(tmp_path / "run"), out))
    assert "No best-trial comparison: the run has no SFT trial table" in text
    assert [p.name for p in out.glob("compare_reference_vs_*.csv")] == ["compare_reference_vs_base.csv"]


def _false_verdict_rates(scores: np.ndarray, n_sim: int, n_perm: int, seed: int) -> dict[str, float]:
    """Share of null shuffles with >= 1 significant (Holm, 0.05) comparison of the other trials vs the reference.

    `scores` is prompts x trials. Each simulation shuffles the trials' scores within every prompt (the null:
    no trial differs), then compares the other trials with the reference by compare_variants' test (sign-flip
    p-values from the same seeded signs, Holm over the family). The reference is fixed in advance, chosen by
    an independent validation loss (what the report does), or chosen by the highest mean on these test scores.
    """
    n, k = scores.shape
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((n_sim, n, k)), axis=2)
    shuffled = np.take_along_axis(np.broadcast_to(scores, (n_sim, n, k)), order, axis=2)
    signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(n_perm, n))  # paired_permutation_pvalue's draw
    references = {
        "fixed": np.zeros(n_sim, dtype=int),
        "validation": rng.normal(size=(n_sim, k)).argmin(axis=1),
        "test": shuffled.mean(axis=1).argmax(axis=1),
    }
    rates = {}
    for name, ref in references.items():
        others = np.array([[j for j in range(k) if j != r] for r in ref])
        diffs = np.take_along_axis(shuffled, others[:, None, :], axis=2) - np.take_along_axis(
            shuffled, ref[:, None, None], axis=2
        )  # n_sim x n x (k - 1)
        flat = diffs.transpose(1, 0, 2).reshape(n, -1)
        observed = np.abs(flat.sum(axis=0))
        hits = (np.abs(signs @ flat) >= observed - 1e-9 * np.maximum(1.0, observed)).sum(axis=0)
        p = ((hits + 1) / (n_perm + 1)).reshape(n_sim, k - 1)
        if name == "fixed":  # the vectorized p-value is the library's, draw for draw
            assert p[0, 0] == paired_permutation_pvalue(shuffled[0, :, 1], shuffled[0, :, 0], n_perm=n_perm)
        rates[name] = float(np.mean([(holm(row) <= 0.05).any() for row in p]))
    return rates


def test_reference_chosen_on_test_inflates_false_verdicts(shared_data):
    """Cheap run (2,000 shuffles): fixed 0.048, validation 0.044, test 0.079.

    Measured with n_sim=20,000, n_perm=5,000, seeds 11 and 12 (40,000 shuffles): fixed 0.044, chosen by
    validation loss 0.042, chosen on test 0.076, against the nominal 0.05.
    """
    long = load_wide_scores(shared_data / "seed_outputs" / "evaluation_results_with_scores.csv")
    scores = long.pivot(index="example_id", columns="variant", values="critic/score")
    rates = _false_verdict_rates(scores[["SFT1", "SFT2", "SFT3", "SFT4"]].to_numpy(), 2000, 2000, seed=1)
    assert rates["fixed"] <= 0.06 and rates["validation"] <= 0.06
    assert rates["test"] >= 0.065 and rates["test"] - rates["fixed"] >= 0.02


def test_report_on_the_study_scores(shared_data, tmp_path):
    seed = read_wide_scores(shared_data / "seed_outputs" / "evaluation_results_with_scores.csv")
    _fake_run(tmp_path / "run", seed.long)
    report = write_report(load_run(tmp_path / "run"), tmp_path / "out", baseline="Base", study=seed)
    text = _linked_files_exist(report)
    assert "truncates Base 41.34 (exact 41.3483...), SFT1 42.97 (exact 42.9775...), SFT3 38.24" in text
    assert "but rounds SFTe_DPO2 41.35 (exact 41.3483...)" in text
    assert "Base and SFTe_DPO2 have exactly the same mean (7360/178 = 41.3483146067)" in text
    assert "the published 41.34 vs 41.35 is an artefact of rounding" in text
    assert "No best-trial comparison: no SFT trial variant" in text  # the study's names are not sft/<id>
    study = pd.read_csv(tmp_path / "out" / "study_table.csv").set_index("model")
    assert study.loc["SFTe_DPO2", "exact"] == "7360/178" and study["footer_is_exact_8dp"].all()
    comparison = pd.read_csv(tmp_path / "out" / "compare_critic_vs_Base.csv")
    assert len(comparison) == 6 and not comparison["significant"].any()
    summary = pd.read_csv(tmp_path / "out" / "scores_critic.csv").set_index("variant")
    assert abs(summary.loc["SFTe", "mean"] - 43.62) < 0.01


def test_report_counts_the_dpo_pairs_skipped_as_too_long(tmp_path):
    curve = pd.DataFrame(
        {"round": [1, 1], "step": [1, 2], "loss": [0.69, 0.6], "rewards/margins": [0.0, 0.1]}
    )
    metrics = {"train_pairs": 30, "pairs_too_long": 2, "pairs_too_long_examples": {"too_long": ["a", "b"]}}
    _artifact(tmp_path / "run", "dpo", "d", {"curves.parquet": curve}, metrics)
    run = load_run(tmp_path / "run")
    assert run.manifests.loc[0, "metric/pairs_too_long"] == 2  # scalar metrics only: no dict column
    assert "metric/pairs_too_long_examples" not in run.manifests
    text = write_report(run, tmp_path / "out").read_text()
    assert "- dpo-d: 30 pairs trained, 2 skipped as longer than dpo.max_length (data.bad_rows: skip)" in text


def test_changed_answers_counts_the_prompts_where_dpo_answers_differently_from_the_soup():
    from analysis.report import changed_answers

    rows = [("soup/s", "a", "x"), ("soup/s", "b", "y"), ("soup/s", "c", "z"), ("dpo/round1", "a", "x")]
    rows += [("dpo/round1", "b", "Y"), ("dpo/round1", "c", "w"), ("base", "a", "q")]
    evaluation = pd.DataFrame(rows, columns=["variant", "example_id", "answer"]).assign(sample=0)
    assert changed_answers(evaluation, "soup/s") == [
        "- dpo/round1 answers differently from soup/s on 2 of 3 test prompts (67%)",
        "",
    ]
    assert changed_answers(evaluation.drop(columns="answer"), "soup/s") == []


def test_runs_compare_side_by_side_each_against_its_own_base(tmp_path):
    """Two runs, each judged against its own base: SFT helps the first by ~30 points and ties in the second."""
    from analysis.compare import gains, load_runs, write_comparison

    strong, weak = tmp_path / "strong", tmp_path / "weak"
    _fake_run(strong, _fake_evaluation((("base", 0), ("sft/t0", 30), ("sft/t1", 1))))
    _fake_run(weak, _fake_evaluation((("base", 10), ("sft/t0", 10), ("sft/t1", 12))))
    rows = load_runs([strong, weak])
    assert set(rows["run"]) == {"strong", "weak"} and len(rows) == 2 * 3 * 40 and "model" in rows
    table = gains([strong, weak]).set_index("run")
    # t0 has the lower validation loss in both runs: it is each run's SFT row, whatever its test score.
    assert list(table["variant"]) == ["sft/t0", "sft/t0"]
    assert table.loc["strong", "verdict"] == "better" and 25 < table.loc["strong", "diff"] < 35
    assert table.loc["strong", "ci_lo"] > 0 and table.loc["weak", "verdict"] == "tied with base"
    assert table.loc["weak", "ci_lo"] < 0 < table.loc["weak", "ci_hi"]
    text = write_comparison([strong, weak], tmp_path / "compare").read_text()
    assert "strong" in text and "weak" in text and (tmp_path / "compare" / "comparison.parquet").is_file()
    with pytest.raises(ValueError, match="share a folder name"):
        gains([strong, tmp_path / "other" / "strong"])


def test_tracking_tags_name_the_run_root_as_every_tracked_run_does(tmp_path, monkeypatch):
    """Trial runs (tagged by the driver) and the results run (tagged after the report) must agree, whether
    run.root was given relative, absolute or as a bucket URI."""
    from analysis.tracking import root_tag

    monkeypatch.chdir(tmp_path)
    assert root_tag("runs/x") == root_tag(tmp_path / "runs" / "x") == str(tmp_path.resolve() / "runs" / "x")
    assert root_tag("s3://bucket/runs/x") == "s3://bucket/runs/x"


def test_tracked_results_hold_only_this_runs_artifacts(tmp_path, monkeypatch):
    """Two soups in one root (an earlier config left one): the results run logs the one the pipeline names."""
    import json

    import mlflow

    from analysis.tracking import log_results
    from vlm_posttrain.config import load_config

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    root = tmp_path / "run"
    folders = []
    for key, loss in (("aaa", 1.0), ("bbb", 2.0)):
        folder = root / "soup" / f"soup-{key}"
        folder.mkdir(parents=True)
        manifest = {"stage": "soup", "artifact": f"soup-{key}", "status": "complete", "created": key}
        (folder / "manifest.json").write_text(json.dumps({**manifest, "metrics": {"eval_loss": loss}}))
        folders.append(str(folder))
    uri = f"file://{tmp_path / 'mlruns'}"
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
        [
            f"run.root={root}",
            "tracking.backend=mlflow",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment=t",
        ],
    )
    run_id = log_results(cfg, root, only=[folders[1]])
    mlflow.set_tracking_uri(uri)
    logged = mlflow.get_run(run_id).data
    assert logged.metrics["soup.eval_loss"] == 2.0
    assert logged.tags["vlm_posttrain.artifact.soup"] == "soup-bbb"
    every = log_results(cfg, tmp_path / "run")  # no list: every artifact, a run of its own
    assert (
        every != run_id
        and mlflow.get_run(every).data.tags["vlm_posttrain.artifact.soup"] == "soup-aaa,soup-bbb"
    )
