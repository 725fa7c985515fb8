"""Load a finished (or partly finished) run directory into pandas DataFrames with one call.

    from analysis.run import load_run
    run = load_run("runs/tiny")
    run.trials          # the SFT trial table (plus the soup's rows when a soup exists)
    run.curves          # every trial's reported metrics, long form (train loss per step, eval loss per epoch)
    run.eval            # one row per (variant, system prompt, example, sample) with every judge's score
    run.manifests       # one row per complete artifact: stage, artifact, created, timings, scalar metrics

Each stage's table is read from its newest complete artifact (one whose manifest says ``complete``). The root
may be a bucket (``load_run("s3://bucket/runs/study")``): tables are read where they lie.
Pandas only: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs

from vlm_posttrain.layout import FILES
from vlm_posttrain.store import RunStore

# Which file of which stage's artifact holds which table (file names: vlm_posttrain.layout).
TABLES = {
    "trials": [("soup", FILES["soup"]["trials"]), ("sft", FILES["sft"]["trials"])],
    "curves": [("sft", FILES["sft"]["curves"])],
    "pairs_diagnostics": [("pairs", FILES["pairs"]["diagnostics"])],
    "dpo_curves": [("dpo", FILES["dpo"]["curves"])],
    "eval": [("eval", FILES["eval"]["eval"])],
}


@dataclass
class RunTables:
    root: str  # a local path, or a URI
    manifests: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __getattr__(self, name: str) -> pd.DataFrame | None:
        if name in TABLES:
            return self.tables.get(name)
        raise AttributeError(name)


def complete_artifacts(root: str | Path) -> list[dict]:
    """Every complete artifact's manifest, with its ``location`` (a folder, or a URI on a bucket root)."""
    return RunStore(root).complete_artifacts()


def _newest(artifacts: list[dict], stage: str) -> dict | None:
    of_stage = [a for a in artifacts if a["stage"] == stage]
    return max(of_stage, key=lambda a: a["created"]) if of_stage else None


def load_run(root: str | Path) -> RunTables:
    store = RunStore(root)
    if store.fs.get_file_info(store.base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"run root '{root}' not found; pass the run.root of a config that has run")
    artifacts = store.complete_artifacts()
    manifests = pd.DataFrame(
        [
            {
                "stage": a["stage"],
                "artifact": a["artifact"],
                "created": a["created"],
                "path": a["location"],
                **{f"timing/{k}": v for k, v in a.get("timings", {}).items()},
                **{
                    f"metric/{k}": v
                    for k, v in a.get("metrics", {}).items()
                    if isinstance(v, int | float | str | bool)
                },
            }
            for a in artifacts
        ]
    )
    tables = {}
    for name, candidates in TABLES.items():
        for stage, filename in candidates:
            artifact = _newest(artifacts, stage)
            if artifact is not None and store.has_file(artifact["location"], filename):
                tables[name] = store.read_table(artifact["location"], filename)
                break
    return RunTables(root=store.uri(), manifests=manifests, tables=tables)
