"""The whole experiment, stage after stage, each skipped when its artifact already exists.

    python -m ray_jobs.pipeline                         # the embedded default, configs/tiny.yaml
    python -m ray_jobs.pipeline configs/study.yaml      # the study (needs a GPU and the real checkpoints)
    ray job submit --working-dir . -- python -m ray_jobs.pipeline configs/study.yaml
    python -m ray_jobs.pipeline configs/study.yaml --plan   # the preflight plan only (no GPU, no Ray)

Stages: model (tiny only) -> data -> sft (Tune grid) -> soup (Ray task) -> [pairs (Ray Data) -> dpo (Tune
trial)] x dpo.rounds -> eval (Ray Data) -> report. Round 1 generates pairs with the soup; round r with round
r-1's DPO policy.

``--plan`` runs nothing: it prints rows per split and the rows the data stage would skip, token lengths
against every stage's limit, the SFT grid's trials with their memory estimate, GPU packing and optimizer
steps, and the generation work of the pairs and eval stages (``vlm_posttrain.plan``); it exits 2 with one
``error:`` line when a later stage would fail on this input.
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
from ray_jobs.session import cli, parse_cli


def _options(parser) -> None:
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the preflight plan (rows, token lengths vs the limits, the SFT grid's memory and steps, "
        "generation work) and exit: trains nothing, starts no Ray, needs no GPU; exit 2 if a stage would fail",
    )


def plan(cfg) -> None:
    """``--plan``: print the preflight plan; a problem a later stage would stop on raises (exit 2)."""
    from vlm_posttrain.plan import build_plan, check, render

    result = build_plan(cfg)
    print(render(result), flush=True)
    check(result)


@cli
def main(argv: list[str] | None = None) -> None:
    cfg, store, args = parse_cli(__doc__, argv, options=_options)
    if args.plan:
        return plan(cfg)
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
