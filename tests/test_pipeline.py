"""The pipeline driver end to end on a tiny model, with two pairs -> dpo rounds: round 1 samples the soup,
round 2 samples round 1's DPO policy and trains from it, eval answers as every variant, the report is written,
and the same command again builds nothing."""

import json
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from vlm_posttrain.layout import PROVENANCE


def _manifest(path: str) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


@pytest.mark.slow
def test_pipeline_runs_two_dpo_rounds_each_from_the_newest_policy(
    tiny_model_dir, tiny_config, tmp_path, local_ray, capsys, monkeypatch
):
    from ray_jobs import pipeline

    # MLflow tracking on a local file store (MLflow 3 wants the opt-in for one).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking_uri = f"file://{tmp_path / 'mlruns'}"

    cfg = tiny_config(
        model={"name": str(tiny_model_dir)},
        data={"limit": 48, "synthetic_families": [], "val_fraction": 0.2, "test_fraction": 0.2},
        sft={"epochs": 1, "grid": {}},
        pairs={"k": 3, "max_new_tokens": 8, "batch_size": 16},
        dpo={"rounds": 2, "epochs": 1, "batch_size": 1, "warmup_ratio": 0.0, "holdout_fraction": 0.0},
        eval={"limit": 4, "max_new_tokens": 6, "batch_size": 16},
        tracking={"backend": "mlflow", "tracking_uri": tracking_uri, "experiment": "pipeline-test"},
    )
    config = str(tmp_path / "config.yaml")  # what tiny_config wrote and loaded
    pipeline.main([config])
    capsys.readouterr()

    root = Path(cfg.run.root)
    (soup,) = root.glob("soup/soup-*")
    pairs = sorted((_manifest(p) for p in root.glob("pairs/pairs-*")), key=lambda m: m["created"])
    dpo = sorted((_manifest(p) for p in root.glob("dpo/dpo-*")), key=lambda m: m["created"])
    assert len(pairs) == len(dpo) == 2
    assert pairs[0]["inputs"]["policy"] == str(soup / "adapter")
    assert dpo[0]["inputs"]["start_adapter"] == str(soup / "adapter") and dpo[0]["metrics"]["round"] == 1
    round1 = f"{dpo[0]['path']}/adapter"
    assert pairs[1]["inputs"]["policy"] == round1, "round 2's pairs must come from round 1's policy"
    assert dpo[1]["inputs"]["start_adapter"] == round1 and dpo[1]["metrics"]["round"] == 2
    assert dpo[1]["inputs"]["pairs"] == pairs[1]["path"]
    one, two = (load_file(f"{d['path']}/adapter/adapter_model.safetensors") for d in dpo)
    assert any(not (one[k] == two[k]).all() for k in one), "round 2 changed nothing"
    for adapter, stage in ((soup / "adapter", "soup"), (Path(round1), "dpo")):
        assert json.loads((adapter / PROVENANCE).read_text())["stage"] == stage

    (eval_dir,) = root.glob("eval/eval-*")
    variants = set(pd.read_parquet(eval_dir / "eval.parquet")["variant"])
    assert {"base", "soup/delta_mean", "dpo/round1", "dpo/round2"} <= variants
    assert sum(v.startswith("sft/") for v in variants) == 1
    (report,) = root.glob("report/report-*/report.md")
    assert "dpo/round2" in report.read_text()

    tracked = _tracked(tracking_uri, "pipeline-test")
    check_tracking(tracked, root)

    pipeline.main([config])
    assert len(_tracked(tracking_uri, "pipeline-test")) == len(tracked)  # nothing logged twice
    err = capsys.readouterr().err
    assert (
        "building" not in err and err.count("already complete, skipped") == 9
    )  # model is a folder: no stage


def _tracked(tracking_uri: str, experiment: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_names=[experiment])


def check_tracking(runs: pd.DataFrame, root: Path) -> None:
    """The SFT trial and both DPO rounds as MLflow runs (params: the trial config; the final eval_loss), and one
    results run whose eval means are the report's, tagged back to the run root and the artifacts."""
    from analysis.run import load_run

    stage = runs["tags.vlm_posttrain.stage"]
    assert (runs["tags.vlm_posttrain.run_root"] == str(root.resolve())).all()
    (sft,) = runs[stage == "sft"].to_dict("records")
    trials = load_run(root).trials
    assert float(sft["params.lora_alpha"]) == trials["config/lora_alpha"].iloc[0]
    assert float(sft["params.learning_rate"]) == trials["config/learning_rate"].iloc[0]
    assert sft["metrics.eval_loss"] == trials["eval_loss"].iloc[0]
    (artifact,) = root.glob("sft/sft-*")
    assert sft["tags.vlm_posttrain.artifact"] == artifact.name
    assert len(runs[stage == "dpo"]) == 2 and runs.loc[stage == "dpo", "metrics.loss"].notna().all()
    (results,) = runs[stage == "results"].to_dict("records")
    (eval_dir,) = root.glob("eval/eval-*")
    means = _manifest(str(eval_dir))["metrics"]["mean_scores"]["reference/score"]
    for variant, mean in means.items():
        assert results[f"metrics.eval.reference.{variant}.mean"] == pytest.approx(mean, abs=1e-3)
        assert (
            results[f"metrics.eval.reference.{variant}.ci_lo"]
            <= mean
            <= results[f"metrics.eval.reference.{variant}.ci_hi"]
        )
    assert results["metrics.soup.self_check_passed"] == 1.0
    assert results["tags.vlm_posttrain.artifact.eval"] == eval_dir.name
    assert results["params.model.name"] == str(Path(_manifest(str(eval_dir))["inputs"]["model"]))
    logged = Path(results["artifact_uri"].removeprefix("file://")) / "report"
    assert (logged / "report.md").is_file()
