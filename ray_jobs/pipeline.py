"""The whole experiment, stage after stage, each skipped when its artifact already exists.

    python -m ray_jobs.pipeline                         # the embedded default, configs/tiny.yaml
    python -m ray_jobs.pipeline configs/study.yaml      # the study (needs a GPU and the real checkpoints)
    ray job submit --working-dir . -- python -m ray_jobs.pipeline configs/study.yaml
    python -m ray_jobs.pipeline configs/study.yaml --plan   # the preflight plan only (no GPU, no Ray)
    python -m ray_jobs.pipeline configs/tiny.yaml --until soup  # every stage up to the soup

Stages: model (tiny only) -> data -> sft (Tune grid) -> soup (Ray task) -> [pairs (Ray Data) -> dpo (Tune
trial)] x dpo.rounds -> eval (Ray Data) -> report. Round 1 generates pairs with the soup; round r with round
r-1's DPO policy. :func:`run` is this sequence as a function, and every stage driver's ``main`` builds (or
finds) its inputs with it: ``built = run(cfg, store, until="sft"); built.sft``.

``--plan`` runs nothing: it prints rows per split and the rows the data stage would skip, token lengths
against every stage's limit, the SFT grid's trials with their memory estimate, GPU packing and optimizer
steps, and the generation work of the pairs and eval stages (``vlm_posttrain.plan``); it exits 2 with one
``error:`` line when a later stage would fail on this input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ray_jobs import data as data_job
from ray_jobs import dpo as dpo_job
from ray_jobs import eval as eval_job
from ray_jobs import model as model_job
from ray_jobs import pairs as pairs_job
from ray_jobs import report as report_job
from ray_jobs import sft as sft_job
from ray_jobs import soup as soup_job
from ray_jobs.session import cli, parse_cli
from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.layout import FILES, STAGES
from vlm_posttrain.store import RunStore, join


@dataclass
class Built:
    """The artifact paths a run built or found (``model``: the base's folder or hub id); one per DPO round."""

    model: str = ""
    data: str = ""
    sft: str = ""
    soup: str = ""
    pairs: list[str] = field(default_factory=list)
    dpo: list[str] = field(default_factory=list)
    eval: str = ""
    report: str = ""


def run(cfg: ExperimentConfig, store: RunStore, until: str = "report") -> Built:
    """Every stage up to and including ``until``, each skipped when its artifact exists; every driver's
    ``main`` runs its inputs' stages through here. ``until="pairs"`` stops after round 1's pairs."""
    if until not in STAGES:
        raise ValueError(f"until '{until}': not a stage; choose from {', '.join(STAGES)}")
    last = STAGES.index(until)
    built = Built()
    if until == "data":  # the data stage needs no model
        built.data = data_job.run(cfg, store)
        return built
    built.model = model_job.run(cfg, store)
    if last < STAGES.index("data"):
        return built
    built.data = data_job.run(cfg, store)
    if last < STAGES.index("sft"):
        return built
    built.sft = sft_job.run(cfg, store, built.model, built.data)
    if last < STAGES.index("soup"):
        return built
    built.soup = soup_job.run(cfg, store, built.model, built.data, built.sft)
    if last < STAGES.index("pairs"):
        return built
    # Artifacts are handed on as the store names them (URIs on an object-store root): whatever process loads
    # one copies it to its own node.
    policy = join(built.soup, FILES["soup"]["adapter"])
    for round_index in range(1, cfg.dpo.rounds + 1):
        built.pairs.append(pairs_job.run(cfg, store, built.model, built.data, policy))
        if until == "pairs":
            return built
        built.dpo.append(dpo_job.run(cfg, store, built.model, policy, built.pairs[-1], round_index))
        policy = join(built.dpo[-1], FILES["dpo"]["adapter"])
    if last < STAGES.index("eval"):
        return built
    variants = eval_job.variants_of(cfg, built.sft, built.soup, built.dpo)
    built.eval = eval_job.run(cfg, store, built.model, built.data, variants)
    if until == "report":
        built.report = report_job.run(cfg, store)
        if cfg.tracking.backend == "mlflow":
            from analysis.tracking import log_results

            paths = [
                built.model,
                built.data,
                built.sft,
                built.soup,
                *built.pairs,
                *built.dpo,
                built.eval,
                built.report,
            ]
            run_id = log_results(cfg, store.root, [p for p in paths if p])
            print(f"[tracking] results logged to MLflow run {run_id}", file=sys.stderr)
    return built


def _options(parser) -> None:
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the preflight plan (rows, token lengths vs the limits, the SFT grid's memory and steps, "
        "generation work) and exit: trains nothing, starts no Ray, needs no GPU; exit 2 if a stage would fail",
    )
    parser.add_argument(
        "--until",
        choices=STAGES,
        default="report",
        help="the last stage to run (default report: the whole experiment)",
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
    built = run(cfg, store, until=args.until)
    print(
        f"run root: {store.root}\nsft: {built.sft}\nsoup: {built.soup}\ndpo: {', '.join(built.dpo)}\n"
        f"eval: {built.eval}"
    )


if __name__ == "__main__":
    main()
