"""Base-model driver: resolves ``model.name`` to a folder; for ``tiny`` builds the offline tiny model once
(of ``model.family``: LLaVA-1.5 by default, LLaVA-OneVision or Qwen2.5-VL).

A hub id or local folder is used as it is. ``tiny`` is built from config, instruction-tuned on synthetic
charts, and stored as a ``model-<hash>`` artifact, so every later run with the same settings reuses it.

    python -m ray_jobs.model configs/tiny.yaml
"""

from __future__ import annotations

import time

from ray_jobs.session import cli, parse_args, stage
from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.store import RunStore, build_manifest


def run(cfg: ExperimentConfig, store: RunStore) -> str:
    """The base model's folder (or hub id) that every stage loads."""
    if cfg.model.name != "tiny":
        from vlm_posttrain.modeling import check_source

        check_source(cfg.model.name)  # here, in one line, not later inside every trial
        return cfg.model.name
    from vlm_posttrain.tiny import build_tiny_base

    key = store.stage_key("model", cfg.keyed("model"), {}, cfg.run.seed)

    def build() -> None:
        staging = store.staging("model", key)
        start = time.time()
        metrics = build_tiny_base(
            staging,
            cfg.model.tiny_pretrain_examples,
            cfg.model.tiny_pretrain_epochs,
            cfg.run.seed,
            cfg.model.family_name,
        )
        manifest = build_manifest(
            "model",
            cfg.section("model"),
            {},
            cfg.run.seed,
            metrics=metrics,
            timings={"build_s": time.time() - start},
        )
        store.publish(staging, "model", key, manifest)

    # On an object-store root a URI: every process that loads the base copies it to its own machine.
    return stage("model", key, store, build)


@cli
def main(argv: list[str] | None = None) -> None:
    cfg, store = parse_args(__doc__, argv)
    print(run(cfg, store))


if __name__ == "__main__":
    main()
