"""SFT stage driver: the LoRA/QLoRA hyperparameter grid as Ray Tune trials sharing the GPU (or the CPUs).

Each grid point of ``sft.grid`` is one trial running TRL's SFTTrainer (``trainables/sft.py``). Trials ask
for ``resources.cpus_per_trial`` / ``resources.gpus_per_trial`` (a fraction shares one GPU) and at most
``resources.max_concurrent_trials`` run at once. Tune keeps the best checkpoint of each trial by
``eval_loss``; an interrupted grid resumes with ``Tuner.restore``. The artifact holds each trial's best
adapter under ``adapters/<trial_id>/`` (loadable with ``PeftModel.from_pretrained``) and the trial table.

    python -m ray_jobs.sft configs/tiny.yaml [key=value ...]
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pandas as pd

from ray_jobs.session import cli, connect, parse_args, raise_input_errors, stage, tuner, user_error
from vlm_posttrain.config import GRID_KEYS, ExperimentConfig
from vlm_posttrain.layout import ADAPTER_FILES, FILES
from vlm_posttrain.store import RunStore, build_manifest, local_copy, write_provenance

TRIALS, CURVES, ADAPTERS = (FILES["sft"][name] for name in ("trials", "curves", "adapters"))


def param_space(cfg: ExperimentConfig) -> dict:
    """``sft.grid`` for Tune, whose grid_search visits the points of ``SftConfig.points`` in their order
    (tested). The unswept keys ride along as constants, so every ``config/<key>`` column is in the table."""
    from ray import tune

    fixed = {k: getattr(cfg.sft, k) for k in GRID_KEYS if k not in cfg.sft.grid}
    return {**fixed, **{k: tune.grid_search(v) for k, v in cfg.sft.grid.items()}}


def gpus_per_trial(cfg: ExperimentConfig, base_dir: str) -> float:
    """Each trial's GPU share, checked against its memory estimate before any trial starts.

    Ray's fraction is only a label, so a share that would not fit the card is refused here, with the numbers
    (``vlm_posttrain.memory``); ``auto`` picks the largest share count that fits; CPU-only (0) is left alone.
    """
    if cfg.resources.gpus_per_trial == 0:
        return 0.0
    import ray
    from transformers import AutoConfig

    from vlm_posttrain.memory import gpu_share

    if cfg.resources.gpus_per_trial == "auto" and not ray.cluster_resources().get("GPU"):
        print("[sft] gpus_per_trial: auto, but the cluster has no GPU: trials run on CPU")
        return 0.0
    model_config = AutoConfig.from_pretrained(
        local_copy(base_dir), trust_remote_code=cfg.model.trust_remote_code
    )
    fraction, plan = gpu_share(cfg, model_config)
    print(f"[sft] {plan}")
    return fraction


def make_tuner(cfg: ExperimentConfig, store: RunStore, key: str, base_dir: str, data_dir: str):
    from ray import tune

    from trainables.sft import SftSetup, train_sft

    setup = SftSetup(cfg.sft, cfg.model, base_dir, data_dir, cfg.run.seed, cfg.data.bad_rows)
    gpus = gpus_per_trial(cfg, base_dir)
    return tuner(
        "sft",
        key,
        store,
        tune.with_parameters(train_sft, setup=setup),
        cfg,
        gpus,
        tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute="eval_loss", checkpoint_score_order="min"
        ),
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            max_concurrent_trials=cfg.resources.max_concurrent_trials,
            # A CPU trial's worker process runs the next trial too, so its torch/transformers/TRL imports
            # (10-17 s on 2 cores) are paid per worker, not per trial (benchmarks/grid.py). Not on GPUs,
            # where a reused process could still hold the last trial's memory as the next loads its model.
            reuse_actors=gpus == 0,
        ),
    )


def collect_adapters(cfg: ExperimentConfig, results, staging: Path, inputs: dict) -> pd.DataFrame:
    """Copy each trial's best adapter into the artifact, with its provenance, and build the trial table."""
    raise_input_errors(results)
    errors = [r for r in results if r.error]
    if errors:
        if user_error(errors[0].error):
            raise errors[0].error  # an input problem: the driver prints it as one line
        raise RuntimeError(f"{len(errors)} SFT trial(s) failed; first error: {errors[0].error}")
    df = results.get_dataframe()
    adapters = []
    for result in results:
        trial_id = result.metrics["trial_id"]
        checkpoint = result.get_best_checkpoint("eval_loss", "min")
        out = staging / ADAPTERS / trial_id
        out.mkdir(parents=True)
        with checkpoint.as_directory() as d:
            for name in ADAPTER_FILES:
                shutil.copy2(Path(d) / name, out / name)
        best = min((m for _, m in result.best_checkpoints), key=lambda m: m["eval_loss"])
        trial = dataclasses.asdict(cfg.sft.at({k: v for k, v in result.config.items() if k in GRID_KEYS}))
        write_provenance(
            out,
            "sft",
            {"sft": trial, "model": cfg.section("model")},
            inputs,
            cfg.run.seed,
            trial_id=trial_id,
            best_eval_loss=best["eval_loss"],
        )
        adapters.append(
            {"trial_id": trial_id, "adapter": f"{ADAPTERS}/{trial_id}", "best_eval_loss": best["eval_loss"]}
        )
    df = df.merge(pd.DataFrame(adapters), on="trial_id")
    first = ["trial_id", *[c for c in df.columns if c.startswith("config/")]]
    first += ["train_loss", "eval_loss", "best_eval_loss", "epoch", "time_total_s", "adapter"]
    return df[[c for c in first if c in df.columns] + [c for c in df.columns if c not in first]]


def learning_curves(results) -> pd.DataFrame:
    """Every metric row each trial reported (train loss per logging step, eval loss per epoch), long form."""
    keep = ["trial_id", "step", "epoch", "train_loss", "eval_loss", "time_total_s"]
    frames = [r.metrics_dataframe.assign(trial_id=r.metrics["trial_id"]) for r in results]
    df = pd.concat(frames, ignore_index=True)
    return df[[c for c in keep if c in df.columns]]


def run(cfg: ExperimentConfig, store: RunStore, base_dir: str, data_dir: str) -> str:
    inputs = {"model": base_dir, "data": data_dir}
    key = store.stage_key("sft", cfg.keyed("sft"), inputs, cfg.run.seed)

    def build() -> None:
        connect()
        start = time.time()
        results = make_tuner(cfg, store, key, base_dir, data_dir).fit()
        staging = store.staging("sft", key)
        table = collect_adapters(cfg, results, staging, inputs)
        table.to_parquet(staging / TRIALS, index=False)
        learning_curves(results).to_parquet(staging / CURVES, index=False)
        best = table.loc[table["best_eval_loss"].idxmin()]
        manifest = build_manifest(
            "sft",
            cfg.section("sft"),
            inputs,
            cfg.run.seed,
            metrics={
                "trials": len(table),
                "best_trial": best["trial_id"],
                "best_eval_loss": float(best["best_eval_loss"]),
            },
            timings={"grid_s": time.time() - start},
            resources=cfg.section("resources"),
            tune_experiment=store.tune_experiment("sft", key),
        )
        store.publish(staging, "sft", key, manifest)

    path = stage("sft", key, store, build)
    print_table(store.read_table(path, TRIALS))
    return path


def print_table(df: pd.DataFrame) -> None:
    cols = [c for c in df.columns if c.startswith("config/")] + [
        "train_loss",
        "eval_loss",
        "epoch",
        "time_total_s",
    ]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(df.set_index("trial_id")[[c for c in cols if c in df.columns]].to_string())


@cli
def main(argv: list[str] | None = None) -> None:
    from ray_jobs import pipeline

    cfg, store = parse_args(__doc__, argv)
    print(pipeline.run(cfg, store, until="sft").sft)


if __name__ == "__main__":
    main()
