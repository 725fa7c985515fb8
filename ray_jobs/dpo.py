"""DPO stage driver: one DPO run as a Ray Tune trial, so it can share the GPU and resume after a crash.

The trial (``trainables/dpo.py``) continues a starting adapter (round 1: the soup's ``adapter/``; round r:
round r-1's DPO ``adapter/``) on a preference parquet with TRL's DPOTrainer, the frozen copy of the
starting adapter as reference. It asks for ``resources.cpus_per_trial`` / ``resources.gpus_per_trial``;
an interrupted run resumes from its last epoch with ``Tuner.restore``. The artifact ``dpo-<key>/`` holds
``adapter/`` (the whole policy, soup + DPO update, loadable alone with ``PeftModel.from_pretrained``, with
its ``provenance.json``), ``curves.parquet`` (loss, rewards and log-probabilities per logging step) and the
manifest.

Inside ``ray_jobs.pipeline`` the pairs and soup stages supply the inputs; on its own the driver takes them
from two flags:

    python -m ray_jobs.dpo configs/tiny.yaml --pairs PAIRS --start-adapter ADAPTER_DIR [key=value ...]

``PAIRS`` is a preference parquet or a pairs artifact folder (its ``pairs.parquet``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd

from ray_jobs import sft as sft_job
from ray_jobs.session import InputError, cli, connect, parse_cli, raise_input_errors, stage, tuner
from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.layout import FILES, MANIFEST
from vlm_posttrain.store import RunStore, build_manifest, local_copy, write_provenance

ADAPTER, CURVES = FILES["dpo"]["adapter"], FILES["dpo"]["curves"]


def make_tuner(cfg: ExperimentConfig, store: RunStore, key: str, setup):
    from ray import tune

    from trainables.dpo import train_dpo_trial

    return tuner(
        "dpo",
        key,
        store,
        tune.with_parameters(train_dpo_trial, setup=setup),
        cfg,
        # The SFT trials' share (``auto`` resolved from their memory estimate); a DPO step holds about twice
        # an SFT step's tokens (chosen and rejected), so the estimate is a lower bound here.
        sft_job.gpus_per_trial(cfg, setup.base_dir),
        # The newest checkpoint: the last epoch while training, the finished policy at the end.
        tune.CheckpointConfig(num_to_keep=1),
    )


def collect_policy(results, staging: Path, round_index: int) -> dict:
    """Copy the trial's finished policy (adapter + learning curve, laid out as this artifact) into the
    artifact; returns its summary."""
    raise_input_errors(results)
    result = results[0]
    if result.error:
        raise RuntimeError(f"the DPO trial failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / ADAPTER, staging / ADAPTER)
        curve = pd.read_parquet(Path(d) / CURVES)
    curve.insert(0, "round", round_index)
    curve.to_parquet(staging / CURVES, index=False)
    keep = ("train_loss", "first_loss", "epoch", "steps", "train_pairs", "heldout_pairs")
    summary = {k: result.metrics[k] for k in keep if k in result.metrics}
    prefixes = ("rewards/", "logps/", "heldout/")
    summary |= {k: v for k, v in result.metrics.items() if k.startswith(prefixes)}
    return summary


def no_pairs_message(pairs_dir: str) -> str:
    """Why a pairs artifact holds no pair (from its manifest's counts) and what to change."""
    folder = Path(pairs_dir) if Path(pairs_dir).is_dir() else Path(pairs_dir).parent
    manifest = folder / MANIFEST
    counts = ""
    if manifest.is_file():
        metrics = json.loads(manifest.read_text())["metrics"]
        diagnostics = metrics.get("diagnostics", {})
        ties, unparsed = diagnostics.get("ties", {}), diagnostics.get("unparsed", {})
        counts = (
            f" from {metrics.get('prompts', '?')} prompts ({ties.get('k', '?')} with best and worst sample "
            f"tied, {unparsed.get('k', '?')} of {unparsed.get('n', '?')} verdicts unparsed)"
        )
    return (
        f"pairs '{folder.name}': no preference pair{counts}; DPO has nothing to learn from: give the pairs "
        "stage more prompts (pairs.limit), more samples per prompt (pairs.k), a lower pairs.tie_margin, or "
        "another pairs.judge"
    )


def check_pairs(cfg: ExperimentConfig, base_dir: str, pairs_dir: str) -> dict:
    """Before any DPO trial: the pairs exist and fit ``dpo.max_length`` (under ``data.bad_rows: skip`` the
    longer ones are counted, and the trial drops the same ones); returns the counts for the manifest."""
    from vlm_posttrain import dpo, modeling

    pairs_dir = local_copy(pairs_dir)
    pairs = pd.read_parquet(dpo.find_pairs(pairs_dir))
    if pairs.empty:
        raise InputError(no_pairs_message(pairs_dir))
    processor = modeling.load_processor(local_copy(base_dir), cfg.model.trust_remote_code)
    kept, rejects = dpo.fit_pairs(pairs, processor, cfg.dpo.max_length, cfg.data.bad_rows)
    too_long = rejects.counts.get("too_long", 0)
    if kept.empty:
        raise InputError(
            f"pairs '{Path(pairs_dir).name}': none of its {len(pairs)} pairs fits dpo.max_length="
            f"{cfg.dpo.max_length} whole (prompt, image tokens and the longer answer); raise dpo.max_length"
        )
    if too_long:
        print(f"[dpo] {too_long} of {len(pairs)} pairs exceed dpo.max_length={cfg.dpo.max_length}: skipped")
    return {"pairs_in": len(pairs), "pairs_too_long": too_long, "pairs_too_long_examples": rejects.examples}


def run(
    cfg: ExperimentConfig,
    store: RunStore,
    base_dir: str,
    start_adapter_dir: str,
    pairs_dir: str,
    round_index: int = 1,
) -> str:
    """Round ``round_index``: train from ``start_adapter_dir`` on ``pairs_dir``; returns the artifact path."""
    from trainables.dpo import DpoSetup

    inputs = {"model": base_dir, "start_adapter": str(start_adapter_dir), "pairs": str(pairs_dir)}
    key = store.stage_key("dpo", cfg.keyed("dpo"), {**inputs, "round": round_index}, cfg.run.seed)

    def build() -> None:
        counts = check_pairs(cfg, base_dir, str(pairs_dir))  # bad input stops here, before Ray and any trial
        connect()
        start = time.time()
        setup = DpoSetup(
            cfg.dpo,
            cfg.model,
            base_dir,
            str(start_adapter_dir),
            str(pairs_dir),
            cfg.run.seed,
            cfg.data.bad_rows,
        )
        results = make_tuner(cfg, store, key, setup).fit()
        staging = store.staging("dpo", key)
        summary = collect_policy(results, staging, round_index) | counts
        provenance = {"dpo": cfg.section("dpo"), "model": cfg.section("model")}
        write_provenance(staging / ADAPTER, "dpo", provenance, inputs, cfg.run.seed, round=round_index)
        manifest = build_manifest(
            "dpo",
            cfg.keyed("dpo"),
            inputs,
            cfg.run.seed,
            metrics={"round": round_index, **summary},
            timings={"train_s": time.time() - start},
            resources=cfg.section("resources"),
            tune_experiment=store.tune_experiment("dpo", key),
        )
        store.publish(staging, "dpo", key, manifest)

    return stage("dpo", key, store, build)


def _options(parser) -> None:
    parser.add_argument(
        "--pairs", help="preference parquet, or a pairs artifact folder holding pairs.parquet"
    )
    parser.add_argument("--start-adapter", help="PEFT adapter folder to start from (a soup's adapter/)")
    parser.add_argument("--round", type=int, default=1, help="round number (1 = from the soup)")


@cli
def main(argv: list[str] | None = None) -> None:
    cfg, store, args = parse_cli(__doc__, argv, options=_options)
    missing = [
        flag
        for flag, value in (("--pairs", args.pairs), ("--start-adapter", args.start_adapter))
        if not value
    ]
    if missing:
        raise InputError(
            f"the dpo driver on its own needs {' and '.join(missing)}; give them, or run python -m "
            "ray_jobs.pipeline, which supplies them from the pairs and soup stages"
        )
    from ray_jobs import pipeline

    base_dir = pipeline.run(cfg, store, until="model").model
    print(run(cfg, store, base_dir, args.start_adapter, args.pairs, args.round))


if __name__ == "__main__":
    main()
