"""The run's report: ``report.md`` with the study-style table plus intervals and paired comparisons, PNG plots,
and every table as CSV and parquet, all linked from the report.

    from analysis.report import write_report
    write_report(load_run("runs/tiny"), "runs/tiny/report/latest")

The report opens with a summary: per score column, each variant's mean and 95% interval, its verdict and
paired difference against the baseline, the best SFT trial by validation loss marked, and the number of test
examples; its numbers are the evaluation section's own (`evaluation_numbers`, computed once).
Sections appear for whatever the run has: trials and learning curves (sft, soup), preference-pair
diagnostics (pairs), DPO reward margins (dpo), and per-variant scores with 95% bootstrap intervals and
paired tests against the base and against the best SFT trial (eval), and, given `study=`, the original
study's published table beside the exact means of its scores. Pandas and matplotlib only.

The best trial, the reference of the second set of paired tests, is the SFT trial with the lowest validation
loss in the trial table (`best_trial_by_validation`: it is given the trial table and the variant names, never
a test score). Choosing it by mean test score and then testing it on the same test set biases every
comparison against it: with the study's four SFT trials' scores shuffled within each prompt (the null), the
chance of at least one false verdict after Holm is 0.044 with the reference fixed in advance (0.042 chosen
by an independent validation loss) and 0.076 with the reference chosen by its test mean (40,000 shuffles,
5,000 sign flips; `tests/test_report.py::_false_verdict_rates`, seeds 11 and 12).
Where no trial has a validation loss the report says so and makes no best-trial comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402

from analysis.run import RunTables  # noqa: E402
from analysis.seed_outputs import SeedScores, study_notes, study_table  # noqa: E402
from analysis.stats import compare_variants, main_effects, summarize_variants  # noqa: E402
from vlm_posttrain.layout import FILES  # noqa: E402

SCORE_SUFFIX = "/score"
TRIAL_PREFIX = "sft/"
# Validation loss of a trial's kept adapter: best_eval_loss (the checkpoint the sft stage keeps and eval
# loads), else eval_loss (the last epoch's, equal to it for one epoch or a table without best_eval_loss).
VAL_LOSS_COLUMNS = ("best_eval_loss", "eval_loss")


def _save_table(df: pd.DataFrame, out: Path, name: str) -> str:
    df.to_csv(out / f"{name}.csv", index=False)
    df.to_parquet(out / f"{name}.parquet", index=False)
    return f"[{name}.csv]({name}.csv) · [{name}.parquet]({name}.parquet)"


def _md(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt) if len(df) else "_(empty)_"


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for trial_id, df in curves.groupby("trial_id"):
        train = df.dropna(subset=["train_loss"])
        line = ax.plot(train["epoch"], train["train_loss"], label=f"{trial_id} train", alpha=0.8)[0]
        if "eval_loss" in df:
            val = df.dropna(subset=["eval_loss"])
            ax.plot(val["epoch"], val["eval_loss"], "o--", color=line.get_color(), label=f"{trial_id} val")
    ax.set(xlabel="epoch", ylabel="loss", title="SFT training and validation loss per trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scores(summary: pd.DataFrame, path: Path, score_col: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(summary) + 1.5))
    y = range(len(summary))
    err = [summary["mean"] - summary["ci_lo"], summary["ci_hi"] - summary["mean"]]
    ax.errorbar(summary["mean"], list(y), xerr=err, fmt="o", capsize=4)
    ax.set_yticks(list(y), summary["variant"].astype(str))
    ax.set(xlabel=f"mean {score_col} (95% bootstrap CI)", title="Score per variant")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_differences(comparison: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(comparison) + 1.5))
    y = range(len(comparison))
    err = [comparison["diff"] - comparison["ci_lo"], comparison["ci_hi"] - comparison["diff"]]
    ax.errorbar(comparison["diff"], list(y), xerr=err, fmt="o", capsize=4)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(list(y), comparison["variant"].astype(str))
    ax.set(
        xlabel=f"paired difference vs {comparison['baseline'].iloc[0]} (95% CI)", title="Paired differences"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dpo(dpo: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for col in [c for c in dpo.columns if c.startswith("rewards/")]:
        ax.plot(dpo["step"], dpo[col], label=col)
    ax.set(xlabel="step", title="DPO rewards")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _trial_section(run: RunTables, out: Path) -> list[str]:
    lines = ["## SFT grid", ""]
    trials = run.trials
    cols = ["trial_id", *[c for c in trials.columns if c.startswith("config/")], "train_loss", "eval_loss"]
    lines += [
        _md(trials[[c for c in cols if c in trials.columns]]),
        "",
        _save_table(trials, out, "trials"),
        "",
    ]
    if run.curves is not None and len(run.curves):
        plot_curves(run.curves, out / "loss_curves.png")
        lines += ["![loss curves](loss_curves.png)", "", _save_table(run.curves, out, "curves"), ""]
    return lines


def _effects_section(run: RunTables, out: Path) -> list[str]:
    lines: list[str] = []
    for score_col in [c for c in run.eval.columns if c.endswith(SCORE_SUFFIX)]:
        effects = grid_effects(run.eval, run.trials, score_col)
        if effects is not None:
            name = f"grid_effects_{score_col.removesuffix(SCORE_SUFFIX).replace('/', '_')}"
            lines += [
                f"### Main effects of the SFT grid on {score_col} (difference from the lowest level, 95% CI)",
                "",
            ]
            lines += [_md(effects, ".3f"), "", _save_table(effects, out, name), ""]
    agreement = judge_agreement(run.eval)
    if agreement is not None:
        lines += ["### Judge agreement (same answers)", "", _md(agreement, ".3f"), ""]
        lines += [_save_table(agreement, out, "judge_agreement"), ""]
    return lines


@dataclass(frozen=True)
class BestTrial:
    """The best-trial reference: its variant (None when there is none) and the sentence the report prints."""

    variant: str | None
    note: str


def best_trial_by_validation(trials: pd.DataFrame | None, variants: list[str]) -> BestTrial:
    """The evaluated SFT trial (`sft/<trial_id>`) with the lowest validation loss in the trial table.

    Reads only the trial table (its `trial_id` and `best_eval_loss`, else `eval_loss`) and the names of the
    evaluated variants: no test score can influence the choice. Ties go to the first in the trial table's
    order. Without a trial table, a validation loss column or an evaluated trial with a finite validation
    loss, `variant` is None and `note` says why: the choice never falls back to test scores.
    """
    evaluated = [str(v) for v in variants if str(v).startswith(TRIAL_PREFIX)]
    if not evaluated:
        return BestTrial(
            None, f"No best-trial comparison: no SFT trial variant ({TRIAL_PREFIX}<trial_id>) was evaluated."
        )
    none = "No best-trial comparison: "
    never = " The best trial is chosen by validation loss only, never by test scores."
    if trials is None or "trial_id" not in trials:
        return BestTrial(None, none + "the run has no SFT trial table with `trial_id`." + never)
    column = next((c for c in VAL_LOSS_COLUMNS if c in trials), None)
    if column is None:
        return BestTrial(
            None, none + f"the trial table has no validation loss ({' or '.join(VAL_LOSS_COLUMNS)})." + never
        )
    table = trials.assign(
        variant=TRIAL_PREFIX + trials["trial_id"].astype(str),
        val_loss=pd.to_numeric(trials[column], errors="coerce"),
    )
    candidates = table[table["variant"].isin(evaluated) & table["val_loss"].notna()]
    lacking = sorted(set(evaluated) - set(candidates["variant"]))
    if candidates.empty:
        return BestTrial(None, none + f"no evaluated SFT trial has a `{column}` in the trial table." + never)
    best = candidates.loc[candidates["val_loss"].idxmin()]
    tied = candidates[candidates["val_loss"] == best["val_loss"]]["variant"].tolist()
    note = (
        f"Best trial: **{best['variant']}**, the SFT trial with the lowest validation loss "
        f"(`{column}` = {best['val_loss']:.4g} in the trial table), chosen from the trial table alone, without any test score."
    )
    if len(tied) > 1:
        note += f" Tied on validation loss: {', '.join(tied)}; the first in the trial table is taken."
    if lacking:
        note += f" Not candidates (no `{column}` in the trial table): {', '.join(lacking)}."
    return BestTrial(str(best["variant"]), note)


def _dpo_pairs_lines(manifests: pd.DataFrame) -> list[str]:
    """Per DPO round: the pairs it trained on and those skipped as longer than dpo.max_length."""
    if "metric/train_pairs" not in manifests:
        return []
    rounds = manifests[(manifests["stage"] == "dpo") & manifests["metric/train_pairs"].notna()]
    lines = []
    for row in rounds.to_dict("records"):
        skipped = int(row.get("metric/pairs_too_long", 0) or 0)
        what = (
            f"{skipped} skipped as longer than dpo.max_length (data.bad_rows: skip)"
            if skipped
            else "none skipped"
        )
        lines.append(f"- {row['artifact']}: {int(row['metric/train_pairs'])} pairs trained, {what}")
        lines += _heldout_lines(row)
    return [*lines, ""] if lines else []


def _heldout_lines(row: dict) -> list[str]:
    """Whether the trained preference holds on pairs whose prompts DPO never saw (dpo.holdout_fraction)."""
    n = int(row.get("metric/heldout_pairs", 0) or 0)
    if not n:
        return []
    share = float(row["metric/heldout/margin_positive"])
    k = int(round(share * n))
    ci = scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
    return [
        f"  - held out: {n} pairs on unseen prompts; the policy's implicit reward margin (chosen over "
        f"rejected, against the starting adapter) is positive on {k} ({share:.0%}, 95% CI "
        f"{ci.low:.0%}-{ci.high:.0%}), mean margin {float(row['metric/heldout/margin_mean']):.3f}"
    ]


def _study_section(study: SeedScores, out: Path) -> list[str]:
    table = study_table(study)
    lines = [
        "## The study's published table",
        "",
        "Each model's mean score computed exactly from the study's per-prompt scores (`exact` = sum / n), the"
        " CSV's footer row of means, and the study's published two-decimal table.",
        "",
        _md(table, ".12g"),
        "",
        *[f"- {note}" for note in study_notes(table)],
        "",
        _save_table(table, out, "study_table"),
        "",
    ]
    return lines


@dataclass(frozen=True)
class ScoreNumbers:
    """One score column's numbers: the per-variant summary and the paired comparisons, by reference variant."""

    score_col: str
    summary: pd.DataFrame
    # reference variant -> (its role in the report's wording, compare_variants against it)
    comparisons: dict[str, tuple[str, pd.DataFrame]]


@dataclass(frozen=True)
class EvalNumbers:
    """Everything the summary and the evaluation section print, computed once by `evaluation_numbers`."""

    baseline: str
    best: BestTrial
    scores: list[ScoreNumbers]


DPO_START = "DPO's starting policy: did DPO help, hurt or tie"


def changed_answers(evaluation: pd.DataFrame, reference: str) -> list[str]:
    """Per DPO variant: on how many test prompts its greedy answer differs from ``reference``'s."""
    if "answer" not in evaluation:
        return []
    keys = [c for c in ("system_prompt", "example_id", "sample") if c in evaluation]
    answers = evaluation.pivot_table(index=keys, columns="variant", values="answer", aggfunc="first")
    lines = []
    for variant in [v for v in answers.columns if str(v).startswith("dpo/")]:
        both = answers[[variant, reference]].dropna()
        k, n = int((both[variant] != both[reference]).sum()), len(both)
        lines.append(
            f"- {variant} answers differently from {reference} on {k} of {n} test prompts ({k / n:.0%})"
        )
    return [*lines, ""] if lines else []


def evaluation_numbers(evaluation: pd.DataFrame, trials: pd.DataFrame | None, baseline: str) -> EvalNumbers:
    """Per score column: summarize_variants, and compare_variants against the baseline and the best trial."""
    best = best_trial_by_validation(trials, list(pd.unique(evaluation["variant"])))
    scores = []
    for score_col in [c for c in evaluation.columns if c.endswith(SCORE_SUFFIX)]:
        summary = summarize_variants(evaluation, score_col)
        variants = list(summary["variant"])
        references = {baseline: "the baseline"} if baseline in variants else {}
        if best.variant is not None and best.variant != baseline:
            references[best.variant] = "the best trial, chosen by validation loss"
        soups = [v for v in variants if v.startswith("soup/")]
        if soups and any(v.startswith("dpo/") for v in variants):
            references.setdefault(soups[0], DPO_START)
        comparisons = {
            ref: (role, compare_variants(evaluation, score_col, baseline=ref))
            for ref, role in references.items()
        }
        scores.append(ScoreNumbers(score_col, summary, comparisons))
    return EvalNumbers(baseline, best, scores)


def _interval(lo: float, hi: float) -> str:
    return f"{lo:.1f}\u2013{hi:.1f}" if pd.notna(lo) and pd.notna(hi) else "\u2014"


def _difference(diff: float, lo: float, hi: float) -> str:
    return f"{diff:+.1f} [{lo:.1f}, {hi:.1f}]" if pd.notna(diff) else "\u2014"


def summary_table(numbers: ScoreNumbers, baseline: str, best: str | None) -> pd.DataFrame:
    """The summary's table for one score column: variant, mean, 95% interval, verdict and difference vs baseline.

    Every number comes from `numbers` (the evaluation section's own tables); the best SFT trial by validation
    loss is marked in its variant name. Without the baseline among the variants, verdict and difference are "—".
    """
    vs = numbers.comparisons.get(baseline)
    paired = vs[1].set_index("variant") if vs is not None and len(vs[1]) else pd.DataFrame()
    rows = []
    for row in numbers.summary.itertuples(index=False):
        variant = str(row.variant)
        if variant == baseline and vs is not None:
            verdict, difference = "baseline", "\u2014"
        elif variant in paired.index:
            pair = paired.loc[variant]
            verdict, difference = (
                str(pair["verdict"]),
                _difference(pair["diff"], pair["ci_lo"], pair["ci_hi"]),
            )
        else:
            verdict, difference = "\u2014", "\u2014"
        rows.append(
            {
                "variant": variant + (" (best SFT trial by val loss)" if variant == best else ""),
                "mean": f"{row.mean:.1f}" if pd.notna(row.mean) else "\u2014",
                "95% interval": _interval(row.ci_lo, row.ci_hi),
                f"verdict vs {baseline}": verdict,
                f"difference vs {baseline} [95% CI]": difference,
            }
        )
    return pd.DataFrame(rows)


def _examples_line(numbers: ScoreNumbers, baseline: str) -> str:
    counts = sorted({int(n) for n in numbers.summary["n_examples"]})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}\u2013{counts[-1]}"
    return (
        f"n = {n} test examples per variant (examples with a score); interval: 95% bootstrap over examples; "
        f"difference: paired on examples, minus {baseline}; verdict: sign-flip test, Holm-adjusted, alpha 0.05."
    )


def _summary_section(numbers: EvalNumbers | None) -> list[str]:
    lines = ["## Summary", ""]
    if numbers is None:
        return [*lines, "No evaluation data in this run: nothing to summarize.", ""]
    scored = [s for s in numbers.scores if len(s.summary)]
    if not scored:
        return [*lines, f"No evaluation data in this run: no scored column (`*{SCORE_SUFFIX}`).", ""]
    best = numbers.best.variant
    for score in scored:
        table = summary_table(score, numbers.baseline, best)
        # Cells are text already formatted (one decimal): no numeric re-parsing by tabulate.
        shown = table.to_markdown(index=False, disable_numparse=True)
        lines += [f"### {score.score_col}", "", shown, "", _examples_line(score, numbers.baseline), ""]
    return lines


def _eval_section(numbers: EvalNumbers, evaluation: pd.DataFrame, out: Path) -> list[str]:
    lines = ["## Evaluation", "", numbers.best.note, ""]
    for score in numbers.scores:
        score_col, summary = score.score_col, score.summary
        judge = score_col.removesuffix(SCORE_SUFFIX).replace("/", "_")
        lines += [
            f"### {score_col}: mean per variant with 95% bootstrap interval",
            "",
            _md(summary, ".2f"),
            "",
        ]
        lines += [_save_table(summary, out, f"scores_{judge}"), ""]
        plot_scores(summary, out / f"scores_{judge}.png", score_col)
        lines += [f"![scores]({f'scores_{judge}.png'})", ""]
        for ref, (role, comparison) in score.comparisons.items():
            name = f"compare_{judge}_vs_{str(ref).replace('/', '_')}"
            lines += [
                f"### Paired differences against {ref} ({role}; bootstrap CI, sign-flip p, Holm-adjusted)",
                "",
            ]
            shown = ["variant", "n_pairs", "diff", "ci_lo", "ci_hi", "p_value", "p_holm", "verdict"]
            lines += [_md(comparison[shown], ".3f"), "", _save_table(comparison, out, name), ""]
            plot_differences(comparison, out / f"{name}.png")
            lines += [f"![differences]({name}.png)", ""]
            if role == DPO_START:
                lines += changed_answers(evaluation, ref)
    return lines


def grid_effects(
    evaluation: pd.DataFrame, trials: pd.DataFrame | None, score_col: str
) -> pd.DataFrame | None:
    """Main effect of each swept hyperparameter on the test score, over the SFT trials' answers."""
    if trials is None or "trial_id" not in trials:
        return None
    swept = [c for c in trials.columns if c.startswith("config/") and trials[c].nunique(dropna=True) > 1]
    if not swept:
        return None
    configs = trials.dropna(subset=swept).assign(variant=lambda t: "sft/" + t["trial_id"].astype(str))
    joined = evaluation.merge(configs[["variant", *swept]], on="variant")
    return main_effects(joined, swept, score_col) if len(joined) else None


def judge_agreement(evaluation: pd.DataFrame) -> pd.DataFrame | None:
    """Pearson and Spearman correlation between every two judges' scores of the same answers."""
    cols = [c for c in evaluation.columns if c.endswith(SCORE_SUFFIX)]
    rows = []
    for i, a in enumerate(cols):
        for b in cols[i + 1 :]:
            both = evaluation[[a, b]].dropna()
            rows.append(
                {
                    "judge_a": a,
                    "judge_b": b,
                    "n": len(both),
                    "pearson": both[a].corr(both[b]) if len(both) > 2 else float("nan"),
                    "spearman": both[a].corr(both[b], method="spearman") if len(both) > 2 else float("nan"),
                }
            )
    return pd.DataFrame(rows) if rows else None


def write_report(
    run: RunTables, out_dir: str | Path, baseline: str = "base", study: SeedScores | None = None
) -> Path:
    """Write report.md, its plots and tables into out_dir; returns the report's path.

    `study` (from `analysis.seed_outputs.read_wide_scores`) adds the study's published table beside the
    exact means of its scores, with what the published rounding does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = evaluation_numbers(run.eval, run.trials, baseline) if run.eval is not None else None
    lines = [f"# Report: {run.root}", "", *_summary_section(numbers)]
    if len(run.manifests):
        lines += ["## Artifacts", "", _md(run.manifests[["stage", "artifact", "created"]]), ""]
    if run.trials is not None:
        lines += _trial_section(run, out)
    if run.pairs_diagnostics is not None:
        lines += ["## Preference pairs: judge diagnostics", "", _md(run.pairs_diagnostics), ""]
        lines += [_save_table(run.pairs_diagnostics, out, "pairs_diagnostics"), ""]
    if run.dpo_curves is not None and "step" in run.dpo_curves:
        plot_dpo(run.dpo_curves, out / "dpo_rewards.png")
        lines += [
            "## DPO",
            "",
            *_dpo_pairs_lines(run.manifests),
            "![DPO rewards](dpo_rewards.png)",
            "",
            _save_table(run.dpo_curves, out, "dpo"),
            "",
        ]
    if study is not None:
        lines += _study_section(study, out)
    if numbers is not None:
        lines += _eval_section(numbers, run.eval, out)
        lines += _effects_section(run, out)
    path = out / FILES["report"]["report"]
    path.write_text("\n".join(lines))
    return path
