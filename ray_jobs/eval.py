"""Eval stage driver: every model variant answers the test split on a Ray Data actor pool, judges score it.

``test.parquet`` (first ``eval.limit`` examples) x variants x system prompts becomes one task table ->
``map_batches(AnswerTests)`` on an actor pool (each actor loads the base once and attaches every variant's
adapter by name) -> ``map_batches(reference_scores)`` and/or ``map_batches(ScoreWithCritic)`` (the critic
loaded once per actor) -> ``eval.parquet``: one row per (variant, system prompt, example, sample) with
the answer, token count, latency and every judge's score and raw text.

    python -m ray_jobs.eval configs/tiny.yaml [key=value ...]

Run alone, it evaluates the base and the SFT trials of the config's SFT stage (building it if needed).
"""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from vlm_posttrain.eval import Variant

from ray_jobs.session import actor_options, cli, connect, parse_args, stage
from vlm_posttrain.config import EvalConfig, ExperimentConfig, ModelConfig
from vlm_posttrain.data import load_split
from vlm_posttrain.layout import FILES
from vlm_posttrain.store import RunStore, build_manifest, join, local_copy

# torch, transformers and peft are imported where a stage runs, not here: `--help` answers at once.

TABLE = FILES["eval"]["eval"]


class AnswerTests:
    """Ray Data actor: base model once, every variant's adapter attached; answers each batch of tasks."""

    def __init__(
        self, base_dir: str, model_cfg: ModelConfig, variants: list[Variant], cfg: EvalConfig, seed: int
    ):
        from vlm_posttrain.eval import Variant, VariantAnswerer
        from vlm_posttrain.generation import Sampling

        # From the run root to this actor's node, when that is a bucket.
        local = [Variant(v.name, v.adapter and local_copy(v.adapter)) for v in variants]
        self.answerer = VariantAnswerer(local_copy(base_dir), model_cfg, local)
        self.sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        self.samples, self.seed = cfg.samples, seed

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = pd.DataFrame(self.answerer.answer_rows(batch, self.sampling, self.samples, self.seed))
        # The critic needs the image again; keep its bytes beside the answer until scoring is done.
        images = batch.drop_duplicates("example_id").set_index("example_id")["image"]
        return rows.assign(image=rows["example_id"].map(images))


@functools.cache
def _processor(base_dir: str, trust_remote_code: bool):
    # Once per worker process: Ray reuses a task's worker for the next batch.
    from vlm_posttrain import modeling

    return modeling.load_processor(local_copy(base_dir), trust_remote_code)


def prepare_batch(batch: pd.DataFrame, base_dir: str, trust_remote_code: bool) -> pd.DataFrame:
    """Ray Data task: a batch of tasks with their images and prompts through the policy's processor."""
    from vlm_posttrain.eval import prepare_tasks

    return prepare_tasks(_processor(base_dir, trust_remote_code), batch)


class ScoreWithCritic:
    """Ray Data actor: the critic VLM, loaded once, scores each batch of answers."""

    def __init__(self, cfg: EvalConfig):
        from vlm_posttrain.eval import CriticScorer

        self.scorer = CriticScorer.load(cfg)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from vlm_posttrain.data import decode_image
        from vlm_posttrain.eval import critic_scores

        return critic_scores(self.scorer, batch, [decode_image(b) for b in batch["image"]])


def variants_of(
    cfg: ExperimentConfig, sft_dir: str | None, soup_dir: str | None, dpo_dirs=()
) -> list[Variant]:
    """The variants the config asks for, from the artifacts the pipeline built (locations as the store gives
    them: on an object-store root each actor copies the adapters it attaches)."""
    from vlm_posttrain.eval import Variant

    kinds = set(cfg.eval.variants)
    variants = [Variant("base")] if "base" in kinds else []
    if "sft" in kinds and sft_dir:
        trials = pd.read_parquet(join(sft_dir, FILES["sft"]["trials"]))
        variants += [Variant(f"sft/{t.trial_id}", join(sft_dir, t.adapter)) for t in trials.itertuples()]
    if "soup" in kinds and soup_dir:
        variants.append(Variant(f"soup/{cfg.soup.method}", join(soup_dir, FILES["soup"]["adapter"])))
    if "dpo" in kinds:
        adapters = [join(d, FILES["dpo"]["adapter"]) for d in dpo_dirs]
        variants += [Variant(f"dpo/round{i}", a) for i, a in enumerate(adapters, 1)]
    return variants


def task_table(cfg: EvalConfig, data_dir: str, variants: list[Variant]) -> pd.DataFrame:
    test = load_split(data_dir, "test")
    if cfg.limit:
        test = test.head(cfg.limit)
    if test.empty:
        raise ValueError(f"{data_dir}: the test split is empty; raise data.test_fraction")
    frames = [test.assign(variant=v.name, system_prompt=p) for v in variants for p in cfg.system_prompts]
    cols = ["variant", "system_prompt", "example_id", "image", "conversations", "answer_type"]
    return pd.concat(frames, ignore_index=True)[cols]


def evaluate_with_ray(
    cfg: ExperimentConfig, base_dir: str, data_dir: str, variants: list[Variant]
) -> pd.DataFrame:
    out = answer_dataset(cfg, base_dir, data_dir, variants).to_pandas().drop(columns=["image"])
    return out.sort_values(["variant", "system_prompt", "example_id", "sample"], ignore_index=True)


def answer_dataset(cfg: ExperimentConfig, base_dir: str, data_dir: str, variants: list[Variant]):
    """The stage's lazy Ray Data pipeline: task table -> answering pool -> judges (rows keep their image)."""
    import ray

    e = cfg.eval
    tasks = task_table(e, local_copy(data_dir), variants)
    ds = ray.data.from_pandas(tasks).repartition(max(1, math.ceil(len(tasks) / e.batch_size))).materialize()
    # Images decoded and prompts tokenized by Ray Data tasks on the other CPUs, ahead of the answering
    # actor, whose process then only runs the model.
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={"base_dir": base_dir, "trust_remote_code": cfg.model.trust_remote_code},
        batch_size=e.batch_size,
        batch_format="pandas",
        num_cpus=1,
    )
    if e.actors * e.num_cpus >= ray.cluster_resources().get("CPU", 0):
        # A pool holding every CPU could starve the prepare tasks feeding it (a read task upstream of the
        # pairs pools did hang so): prepare every batch first, with no overlap.
        ds = ds.materialize()
    ds = ds.map_batches(
        AnswerTests,
        fn_constructor_kwargs={
            "base_dir": base_dir,
            "model_cfg": cfg.model,
            "variants": variants,
            "cfg": e,
            "seed": cfg.run.seed,
        },
        **actor_options(e),
    )
    if "reference" in e.judges:
        from vlm_posttrain.reference import reference_scores

        ds = ds.map_batches(reference_scores, batch_format="pandas")
    if "critic" in e.judges:
        ds = ds.map_batches(ScoreWithCritic, fn_constructor_kwargs={"cfg": e}, **actor_options(e))
    return ds


def run(cfg: ExperimentConfig, store: RunStore, base_dir: str, data_dir: str, variants: list[Variant]) -> str:
    # Every variant is an input: its adapter, or the base itself.
    inputs = {"model": base_dir, "data": data_dir, **{v.name: v.adapter or base_dir for v in variants}}
    key = store.stage_key("eval", cfg.keyed("eval"), inputs, cfg.run.seed)

    def build() -> None:
        connect()
        start = time.time()
        table = evaluate_with_ray(cfg, base_dir, data_dir, variants)
        staging = store.staging("eval", key)
        table.to_parquet(staging / TABLE, index=False)
        scores = {
            c: table.groupby("variant")[c].mean().round(3).to_dict() for c in table if c.endswith("/score")
        }
        manifest = build_manifest(
            "eval",
            cfg.section("eval"),
            inputs,
            cfg.run.seed,
            metrics={"rows": len(table), "variants": len(variants), "mean_scores": scores},
            timings={"eval_s": time.time() - start},
        )
        store.publish(staging, "eval", key, manifest)

    path = stage("eval", key, store, build)
    table = store.read_table(path, TABLE)
    score_cols = [c for c in table.columns if c.endswith("/score")]
    print(table.groupby("variant")[score_cols].mean().round(2).to_string())
    return path


@cli
def main(argv: list[str] | None = None) -> None:
    from ray_jobs import pipeline

    cfg, store = parse_args(__doc__, argv)
    built = pipeline.run(cfg, store, until="sft")
    print(run(cfg, store, built.model, built.data, variants_of(cfg, built.sft, None)))


if __name__ == "__main__":
    main()
