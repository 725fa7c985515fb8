"""The whole experiment, stage after stage, each skipped when its artifact already exists.

    python -m ray_jobs.pipeline                         # the embedded default, configs/tiny.yaml
    python -m ray_jobs.pipeline configs/study.yaml      # the study (needs a GPU and the real checkpoints)
    ray job submit --working-dir . -- python -m ray_jobs.pipeline configs/study.yaml

Stages so far: model (tiny only), data, sft, soup, report.
"""

from __future__ import annotations

from ray_jobs import data as data_job
from ray_jobs import model as model_job
from ray_jobs import report as report_job
from ray_jobs import sft as sft_job
from ray_jobs import soup as soup_job
from ray_jobs.session import parse_args


def main(argv: list[str] | None = None) -> None:
    cfg, store = parse_args(__doc__, argv)
    base_dir = model_job.run(cfg, store)
    data_dir = data_job.run(cfg, store)
    sft_dir = sft_job.run(cfg, store, base_dir, data_dir)
    soup_dir = soup_job.run(cfg, store, base_dir, data_dir, sft_dir)
    print(f"run root: {store.root}\nsft: {sft_dir}\nsoup: {soup_dir}")
    report_job.run(cfg, store)


if __name__ == "__main__":
    main()
