"""Report stage driver: turns the run directory into ``report.md``, PNG plots and CSV/parquet tables.

    python -m ray_jobs.report configs/tiny.yaml        # report on that config's run root

Runs without Ray (analysis/ only). The artifact's hash covers every complete artifact it reads, so a new
stage result gives a new report and an unchanged run is not re-reported.
"""

from __future__ import annotations

import time

from analysis.report import write_report
from analysis.run import load_run
from ray_jobs.session import cli, parse_args, stage
from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.store import RunStore, build_manifest, digest


def run(cfg: ExperimentConfig, store: RunStore) -> str:
    tables = load_run(store.root)
    # Earlier reports are outputs, not inputs: leaving them out keeps an unchanged run's report key stable.
    manifests = (
        tables.manifests[tables.manifests["stage"] != "report"] if len(tables.manifests) else tables.manifests
    )
    inputs = sorted(manifests["artifact"]) if len(manifests) else []
    key = digest("report", inputs)

    def build() -> None:
        staging = store.staging("report", key)
        start = time.time()
        report = write_report(tables, staging)
        manifest = build_manifest(
            "report",
            {},
            {a: a for a in inputs},
            cfg.run.seed,
            timings={"build_s": time.time() - start},
            files=sorted(p.name for p in staging.iterdir()),
            report=report.name,
        )
        store.publish(staging, "report", key, manifest)

    path = stage("report", key, store, build)
    print(f"report: {path}/report.md")
    return path


@cli
def main(argv: list[str] | None = None) -> None:
    cfg, store = parse_args(__doc__, argv)
    run(cfg, store)


if __name__ == "__main__":
    main()
