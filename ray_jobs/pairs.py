"""Pairs stage driver: K sampled answers per train prompt, judged in pairs, as DPO preference data.

A Ray Data pipeline: ``train.parquet`` (first ``pairs.limit`` prompts) -> ``repartition`` into one block per
batch -> ``map_batches(GenerateAnswers)`` on an actor pool (each actor loads the policy, base + adapter, once)
-> ``map_batches(JudgeAnswers)`` on a second pool (``self`` loads the policy again, ``critic`` the critic) ->
collected here. The work itself is in ``vlm_posttrain.pairs.stage``; the artifact holds ``pairs.parquet`` (TRL's
vision preference format), ``best_of_k/`` (an SFT data folder), ``samples.parquet`` and
``diagnostics.parquet``, and the manifest carries the bias diagnostics. Pool size, batch size and each
actor's ``num_cpus`` / ``num_gpus`` come from the ``pairs`` section; they are not part of the artifact's hash.

    python -m ray_jobs.pairs configs/tiny.yaml [key=value ...]

Run alone, it builds (or reuses) model, data and sft, and uses the best SFT trial's adapter as the policy.
"""

from __future__ import annotations

import math
import sys
import time

import pandas as pd
import pyarrow.parquet as pq

from ray_jobs.session import actor_options, cli, connect, parse_args, stage
from vlm_posttrain.config import ExperimentConfig, ModelConfig, PairsConfig
from vlm_posttrain.layout import FILES
from vlm_posttrain.store import RunStore, build_manifest, join, local_copy

# torch, transformers and peft are imported where a stage runs, not here: `--help` answers at once.


class GenerateAnswers:
    """Ray Data actor: the policy, loaded once, answers each batch k times."""

    def __init__(self, base_dir: str, model_cfg: ModelConfig, adapter_dir: str, cfg: PairsConfig, seed: int):
        from vlm_posttrain.generation import Generator
        from vlm_posttrain.pairs.stage import generate_samples

        # From the run root to this actor's node, when that is a bucket.
        self.generator = Generator.load(local_copy(base_dir), model_cfg, local_copy(adapter_dir))
        self.generate_samples = generate_samples
        self.cfg, self.seed = cfg, seed

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.generate_samples(self.generator, batch, self.cfg, self.seed)


class JudgeAnswers:
    """Ray Data actor: the configured judge, loaded once, judges every pair of each row's samples."""

    def __init__(self, base_dir: str, model_cfg: ModelConfig, adapter_dir: str, cfg: PairsConfig):
        from vlm_posttrain.pairs.judges import build_judge
        from vlm_posttrain.pairs.stage import judge_samples

        self.judge = build_judge(cfg, local_copy(base_dir), model_cfg, local_copy(adapter_dir))
        self.judge_samples = judge_samples

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.judge_samples(self.judge, batch)


def judge_with_ray(cfg: ExperimentConfig, base_dir: str, data_dir: str, adapter_dir: str) -> pd.DataFrame:
    """Read, generate, judge on actor pools; returns the judged rows (one per prompt)."""
    import ray

    p = cfg.pairs
    # A URI on an object-store root: Ray Data's read tasks read the bucket from whichever node runs them.
    path = join(data_dir, FILES["data"]["train"])
    rows = pq.read_metadata(path).num_rows
    ds = ray.data.read_parquet(path)
    if p.limit:
        ds = ds.limit(p.limit)
        rows = min(rows, p.limit)
    # One parquet file is one block: split it so every actor of the pool gets work, one batch per block.
    # Materialized before the actor pools start: once they hold every CPU (2 actors on a 2-CPU machine),
    # a read task would wait for a CPU forever.
    ds = ds.repartition(max(1, math.ceil(rows / p.batch_size))).materialize()
    ds = ds.map_batches(
        GenerateAnswers,
        fn_constructor_kwargs={
            "base_dir": base_dir,
            "model_cfg": cfg.model,
            "adapter_dir": adapter_dir,
            "cfg": p,
            "seed": cfg.run.seed,
        },
        **actor_options(p),
    )
    ds = ds.map_batches(
        JudgeAnswers,
        fn_constructor_kwargs={
            "base_dir": base_dir,
            "model_cfg": cfg.model,
            "adapter_dir": adapter_dir,
            "cfg": p,
        },
        **actor_options(p),
    )
    return ds.to_pandas().sort_values("example_id", ignore_index=True)


def run(cfg: ExperimentConfig, store: RunStore, base_dir: str, data_dir: str, policy_adapter_dir: str) -> str:
    """Build (or reuse) the pairs artifact for this policy; returns its path."""
    inputs = {"model": base_dir, "data": data_dir, "policy": policy_adapter_dir}
    key = store.stage_key("pairs", cfg.keyed("pairs"), inputs, cfg.run.seed)

    def build() -> None:
        from vlm_posttrain.pairs.stage import write_outputs

        connect()
        start = time.time()
        judged = judge_with_ray(cfg, base_dir, data_dir, policy_adapter_dir)
        pipeline_s = time.time() - start
        staging = store.staging("pairs", key)
        metrics = write_outputs(judged, cfg.pairs.judge, local_copy(data_dir), staging)
        metrics["tokens_per_s_wall"] = metrics["generated_tokens"] / pipeline_s if pipeline_s > 0 else 0.0
        manifest = build_manifest(
            "pairs",
            cfg.section("pairs"),
            inputs,
            cfg.run.seed,
            metrics=metrics,
            timings={"pipeline_s": pipeline_s, "total_s": time.time() - start},
        )
        store.publish(staging, "pairs", key, manifest)
        warn_few_pairs(metrics, cfg.pairs.warn_kept_below)

    path = stage("pairs", key, store, build)
    print_summary(store.read_table(path, FILES["pairs"]["diagnostics"]), store.read_manifest(path)["metrics"])
    return path


def warn_few_pairs(metrics: dict, share: float) -> None:
    """A warning when fewer than ``share`` of the prompts kept a pair (the rest tied best and worst)."""
    prompts, pairs = metrics["prompts"], metrics["pairs"]
    if prompts and pairs < share * prompts:
        print(
            f"[pairs] WARNING: {pairs} of {prompts} prompts kept a pair ({pairs / prompts:.0%}, below "
            f"pairs.warn_kept_below={share:g}); the others tied best and worst: DPO learns from few pairs. "
            "More prompts (pairs.limit), samples (pairs.k), a lower pairs.tie_margin or another judge give more",
            file=sys.stderr,
        )


def print_summary(table: pd.DataFrame, metrics: dict) -> None:
    with pd.option_context("display.width", 160, "display.max_columns", 10, "display.max_colwidth", 70):
        print(table.round(3).to_string(index=False))
    print(
        f"[pairs] {metrics['pairs']} pairs from {metrics['prompts']} prompts; "
        f"{metrics['generated_tokens']} tokens generated, {metrics['tokens_per_s_per_actor']:.1f} tokens/s per "
        f"generator actor, {metrics.get('tokens_per_s_wall', 0.0):.1f} tokens/s over the whole pipeline"
    )


def best_sft_adapter(store: RunStore, sft_path: str) -> str:
    """The adapter of the SFT trial with the lowest validation loss (the policy when no soup is given)."""
    best = store.read_manifest(sft_path)["metrics"]["best_trial"]
    return join(sft_path, FILES["sft"]["adapters"], best)


@cli
def main(argv: list[str] | None = None) -> None:
    from ray_jobs import pipeline

    cfg, store = parse_args(__doc__, argv)
    built = pipeline.run(cfg, store, until="sft")
    print(run(cfg, store, built.model, built.data, best_sft_adapter(store, built.sft)))


if __name__ == "__main__":
    main()
