"""Experiment tracking: a finished run's results in MLflow, once per run, tagged back to its manifests.

The SFT and DPO trials reach MLflow while they train, through Ray Tune's ``MLflowLoggerCallback``
(``ray_jobs.session.tracking_callbacks``: the trial's config as params, every logged step's metrics). When the
pipeline has written the report, :func:`log_results` adds one run holding what the stages found: every
numeric metric of every stage's manifest (the soup's self-check, the pair diagnostics, DPO's held-out margin,
...), every eval variant's mean and 95% interval per judge (the report's own numbers), the config as params,
the report's files as artifacts, and tags naming the run root and each stage's artifact ids.

    python -m analysis.tracking configs/tiny.yaml      # log a finished run (the pipeline does this itself)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis.report import evaluation_numbers
from analysis.run import complete_artifacts, load_run
from vlm_posttrain.config import ExperimentConfig, load_config
from vlm_posttrain.store import is_uri, local_copy

TAG_ROOT = "vlm_posttrain.run_root"
TAG_STAGE = "vlm_posttrain.stage"
TAG_ARTIFACT = "vlm_posttrain.artifact"
RESULTS = "results"


def root_tag(root: str | Path) -> str:
    """The run root as every tracked run names it: absolute for a local root, the URI for a bucket."""
    return str(root) if "://" in str(root) else str(Path(root).resolve())


def experiment_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.experiment or cfg.run.name


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}", item).items()}
    return {prefix: value}


def manifest_metrics(artifacts: list[dict]) -> dict[str, float]:
    """Every finite number in the stages' manifest metrics (nested ones too), as ``<stage>.<key>``; DPO rounds
    as ``dpo.round<r>``, pairs artifacts by their id (one per round)."""
    metrics: dict[str, float] = {}
    for artifact in artifacts:
        values = artifact.get("metrics", {})
        prefix = {"dpo": f"dpo.round{values.get('round', 1)}", "pairs": artifact["artifact"]}
        for key, value in _flat(prefix.get(artifact["stage"], artifact["stage"]), values).items():
            if isinstance(value, bool | int | float) and math.isfinite(float(value)):
                metrics[key] = float(value)
    return metrics


def eval_metrics(run) -> dict[str, float]:
    """Every eval variant's mean and 95% interval per judge: the report's summary numbers."""
    metrics: dict[str, float] = {}
    if run.eval is None:
        return metrics
    numbers = evaluation_numbers(run.eval, run.trials, "base")
    for score in numbers.scores:
        judge = score.score_col.split("/")[0]
        for row in score.summary.itertuples(index=False):
            for name in ("mean", "ci_lo", "ci_hi"):
                value = float(getattr(row, name))
                if math.isfinite(value):
                    metrics[f"eval.{judge}.{row.variant}.{name}"] = value
    return metrics


def logged_results(tags: dict[str, str], experiment: str) -> str | None:
    """The id of a results run already logged for these artifacts (a re-run of a finished pipeline)."""
    import mlflow

    keys = [TAG_ROOT, TAG_STAGE, *(k for k in tags if k.startswith(f"{TAG_ARTIFACT}."))]
    where = " and ".join(f"tags.`{k}` = '{tags[k]}'" for k in keys)
    found = mlflow.search_runs(experiment_names=[experiment], filter_string=where, output_format="list")
    return found[0].info.run_id if found else None


def log_results(cfg: ExperimentConfig, root: str | Path, only: Sequence[str] = ()) -> str:
    """One MLflow run with the finished run's results, unless these artifacts are logged; returns its run id.

    ``only``: the artifact folders this run built or found (the pipeline passes them), so artifacts an earlier
    config left in the same root are not mixed in; empty: every complete artifact of the root.
    """
    import mlflow

    run = load_run(root)
    artifacts = complete_artifacts(root)
    if only:
        wanted = {_location(p) for p in only}
        artifacts = [a for a in artifacts if _location(a["location"]) in wanted]
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_experiment(experiment_name(cfg))
    tags = {TAG_ROOT: root_tag(root), TAG_STAGE: RESULTS}
    for stage in sorted({a["stage"] for a in artifacts}):
        ids = sorted(a["artifact"] for a in artifacts if a["stage"] == stage)
        tags[f"{TAG_ARTIFACT}.{stage}"] = ",".join(ids)
    done = logged_results(tags, experiment_name(cfg))
    if done:
        return done
    params = {
        k: v
        for name in ("model", "data", "sft", "soup", "pairs", "dpo", "eval")
        for k, v in _flat(name, cfg.section(name)).items()
    }
    with mlflow.start_run(run_name=f"{cfg.run.name}/{RESULTS}", tags=tags) as active:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({**manifest_metrics(artifacts), **eval_metrics(run)})
        reports = sorted((a for a in artifacts if a["stage"] == "report"), key=lambda a: a["created"])
        if reports:
            mlflow.log_artifacts(local_copy(reports[-1]["location"]), artifact_path="report")
        return active.info.run_id


def _location(path: str | Path) -> str:
    return str(path) if is_uri(path) else str(Path(path).resolve())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            __doc__.strip().splitlines()[0]
            + "\n\nusage: python -m analysis.tracking CONFIG [key.path=value ...]"
        )
        return
    cfg = load_config(argv[0], argv[1:])
    print(log_results(cfg, cfg.run.root))


if __name__ == "__main__":
    main()
