"""Load a finished (or partly finished) run directory into pandas DataFrames with one call.

    from analysis.run import load_run
    run = load_run("runs/tiny")
    run.trials          # the SFT trial table (plus the soup's rows when a soup exists)
    run.curves          # every trial's reported metrics, long form (train loss per step, eval loss per epoch)
    run.eval            # one row per (variant, system prompt, example, sample) with every judge's score
    run.manifests       # one row per complete artifact: stage, artifact, created, timings, scalar metrics

Each stage's table is read from its newest complete artifact (one whose manifest says ``complete``).
Pandas only: no Ray, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vlm_posttrain.layout import FILES, MANIFEST

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
    root: Path
    manifests: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __getattr__(self, name: str) -> pd.DataFrame | None:
        if name in TABLES:
            return self.tables.get(name)
        raise AttributeError(name)


def complete_artifacts(root: Path) -> list[dict]:
    """Every complete artifact's manifest, with its folder."""
    found = []
    for manifest in sorted(root.glob(f"*/*/{MANIFEST}")):
        if manifest.parent.name.startswith("."):
            continue  # a staging folder a moment before its rename: not an artifact yet
        data = json.loads(manifest.read_text())
        if data.get("status") == "complete":
            found.append({**data, "folder": manifest.parent})
    return found


def _newest(artifacts: list[dict], stage: str) -> dict | None:
    of_stage = [a for a in artifacts if a["stage"] == stage]
    return max(of_stage, key=lambda a: a["created"]) if of_stage else None


def load_run(root: str | Path) -> RunTables:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run root '{root}' not found; pass the run.root of a config that has run")
    artifacts = complete_artifacts(root)
    manifests = pd.DataFrame(
        [
            {
                "stage": a["stage"],
                "artifact": a["artifact"],
                "created": a["created"],
                "path": str(a["folder"]),
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
            if artifact is not None and (artifact["folder"] / filename).is_file():
                tables[name] = pd.read_parquet(artifact["folder"] / filename)
                break
    return RunTables(root=root, manifests=manifests, tables=tables)
