"""Data stage driver: read, check and split the configured chart-QA source into train/val/test parquet.

python -m ray_jobs.data configs/tiny.yaml [key=value ...]
"""

from __future__ import annotations

import time

from ray_jobs.session import cli, parse_args, stage
from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.data import build_splits
from vlm_posttrain.store import RunStore, build_manifest


def run(cfg: ExperimentConfig, store: RunStore) -> str:
    key = store.stage_key("data", cfg.keyed("data"), {}, cfg.run.seed)

    def build() -> None:
        staging = store.staging("data", key)
        start = time.time()
        metrics = build_splits(cfg.data, cfg.run.seed, staging)
        manifest = build_manifest(
            "data",
            cfg.section("data"),
            {},
            cfg.run.seed,
            metrics=metrics,
            timings={"build_s": time.time() - start},
            data_hash=metrics["data_hash"],
        )
        store.publish(staging, "data", key, manifest)

    return stage("data", key, store, build)


@cli
def main(argv: list[str] | None = None) -> None:
    cfg, store = parse_args(__doc__, argv)
    print(run(cfg, store))


if __name__ == "__main__":
    main()
