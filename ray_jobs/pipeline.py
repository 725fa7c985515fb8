"""The whole experiment, stage after stage, each skipped when its artifact already exists.

    python -m ray_jobs.pipeline                         # the embedded default, configs/tiny.yaml
    python -m ray_jobs.pipeline configs/study.yaml      # the study (needs a GPU and the real checkpoints)
    ray job submit --working-dir . -- python -m ray_jobs.pipeline configs/study.yaml

Stages: model (tiny only) -> data -> sft (Tune grid) -> soup (Ray task) -> [pairs (Ray Data) -> dpo (Tune
trial)] x dpo.rounds -> eval (Ray Data) -> report. Round 1 generates pairs with the soup; round r with round
r-1's DPO policy.
"""

from __future__ import annotations

from ray_jobs import data as data_job
from ray_jobs import dpo as dpo_job
from ray_jobs import eval as eval_job
from ray_jobs import model as model_job
from ray_jobs import pairs as pairs_job
from ray_jobs import report as report_job
from ray_jobs import sft as sft_job
from ray_jobs import soup as soup_job
from ray_jobs.session import cli, parse_args


@cli
def main(argv: list[str] | None = None) -> None:
    cfg, store = parse_args(__doc__, argv)
    base_dir = model_job.run(cfg, store)
    data_dir = data_job.run(cfg, store)
    sft_dir = sft_job.run(cfg, store, base_dir, data_dir)
    soup_dir = soup_job.run(cfg, store, base_dir, data_dir, sft_dir)
    policy = pairs_job.in_artifact(store, soup_dir, soup_job.ADAPTER_DIR)
    dpo_dirs = []
    for round_index in range(1, cfg.dpo.rounds + 1):
        pairs_dir = pairs_job.run(cfg, store, base_dir, data_dir, policy)
        dpo_dir = dpo_job.run(
            cfg, store, base_dir, policy, pairs_job.in_artifact(store, pairs_dir), round_index
        )
        dpo_dirs.append(dpo_dir)
        policy = pairs_job.in_artifact(store, dpo_dir, dpo_job.ADAPTER)
    variants = eval_job.variants_of(cfg, sft_dir, soup_dir, dpo_dirs)
    eval_dir = eval_job.run(cfg, store, base_dir, data_dir, variants)
    print(
        f"run root: {store.root}\nsft: {sft_dir}\nsoup: {soup_dir}\ndpo: {', '.join(dpo_dirs)}\neval: {eval_dir}"
    )
    report_job.run(cfg, store)


if __name__ == "__main__":
    main()
