"""Soup stage driver: one Ray task averages the chosen SFT adapters into one PEFT adapter and scores it.

The task runs ``vlm_posttrain.soup.stage.soup_payload`` with ``soup.num_cpus`` / ``soup.num_gpus``: select the
trials (``soup.select``), combine their adapter files (``soup.method``), self-check (a failing soup is never
written), then score the soup and each candidate on the val split like the SFT trials. The artifact
``<root>/soup/soup-<key>/`` holds ``adapter/`` (``PeftModel.from_pretrained(base, that folder)``) and
``trials.parquet``: the SFT trial table plus the soup's row (``trial_id`` = ``soup/<method>``), with
``artifact`` naming the artifact each row's ``adapter`` path is relative to and ``in_soup`` marking the
ingredients. The manifest records selection, ingredients and weights, the self-check, SVD truncation
errors or greedy steps, and the soup's val loss beside every candidate's.

    python -m ray_jobs.soup configs/tiny.yaml [key=value ...]
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

from ray_jobs.session import cli, connect, parse_args, stage
from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.layout import FILES
from vlm_posttrain.soup.select import METRIC  # no torch, peft or ray: the driver's --help stays instant
from vlm_posttrain.store import RunStore, build_manifest, local_copy, write_provenance

# torch, transformers and peft are imported where a stage runs, not here: `--help` answers at once.

ADAPTER, TRIALS = FILES["soup"]["adapter"], FILES["soup"]["trials"]


def soup_trials(
    sft_table: pd.DataFrame, payload: dict, sft_id: str, soup_id: str, time_s: float
) -> pd.DataFrame:
    """The SFT trial table plus the soup's row; the soup's val loss fills both eval_loss and best_eval_loss."""
    table = sft_table.copy()
    table["artifact"] = sft_id
    table["in_soup"] = table["trial_id"].astype(str).isin({i["trial_id"] for i in payload["ingredients"]})
    row = {
        "trial_id": f"soup/{payload['method']}",
        "eval_loss": payload["eval_loss"],
        METRIC: payload["eval_loss"],
        "time_total_s": time_s,
        "adapter": ADAPTER,
        "artifact": soup_id,
        "in_soup": False,
    }
    out = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    # The soup row has no grid point: keep integer columns integer (nullable) rather than float.
    for col, dtype in sft_table.dtypes.items():
        if pd.api.types.is_integer_dtype(dtype):
            out[col] = out[col].astype("Int64")
    return out


def _metrics(payload: dict) -> dict:
    losses = [c[METRIC] for c in payload["candidates"] if math.isfinite(c[METRIC])]
    best = min(losses, default=math.nan)
    return {
        "eval_loss": payload["eval_loss"],
        "best_candidate_eval_loss": best,
        "mean_candidate_eval_loss": sum(losses) / len(losses) if losses else math.nan,
        "soup_minus_best_candidate": payload["eval_loss"] - best,
        "ingredients": len(payload["ingredients"]),
        "r": payload["r"],
        "self_check_passed": payload["self_check"]["passed"],
        "self_check_max_rel_error": payload["self_check"]["max_rel_error"],
        "eval_parity_max_abs_diff": payload["eval_parity_max_abs_diff"],
    }


def write_artifact(
    cfg: ExperimentConfig,
    store: RunStore,
    key: str,
    payload: dict,
    inputs: dict[str, str],
    task_s: float,
) -> str:
    """Stage the adapter files and the extended trial table, then publish with the manifest last."""
    staging = store.staging("soup", key)
    adapter = staging / ADAPTER
    adapter.mkdir()
    for name, blob in payload["files"].items():
        (adapter / name).write_bytes(blob)
    soup = {k: payload[k] for k in ("method", "weights", "r", "lora_alpha")}
    ingredients = [i["trial_id"] for i in payload["ingredients"]]
    provenance = {"soup": cfg.section("soup"), "model": cfg.section("model")}
    write_provenance(adapter, "soup", provenance, inputs, cfg.run.seed, **soup, ingredients=ingredients)
    sft_id = Path(inputs["sft"]).name
    sft_table = store.read_table(inputs["sft"], FILES["sft"]["trials"])
    trials = soup_trials(sft_table, payload, sft_id, store.artifact_id("soup", key), task_s)
    trials.to_parquet(staging / TRIALS, index=False)
    extra = {k: payload[k] for k in ("greedy_steps",) if k in payload}
    manifest = build_manifest(
        "soup",
        cfg.keyed("soup"),
        inputs,
        cfg.run.seed,
        metrics=_metrics(payload),
        timings={"task_s": task_s, **payload["timings"]},
        resources={k: getattr(cfg.soup, k) for k in cfg.soup.UNKEYED},
        soup=soup,
        selection=payload["selection"],
        ingredients=payload["ingredients"],
        candidates=payload["candidates"],
        self_check=payload["self_check"],
        method_metrics=payload["method_metrics"],
        warnings=payload["warnings"],
        **extra,
    )
    return store.publish(staging, "soup", key, manifest)


def run(cfg: ExperimentConfig, store: RunStore, base_dir: str, data_dir: str, sft_dir: str) -> str:
    inputs = {"sft": sft_dir, "model": base_dir, "data": data_dir}
    key = store.stage_key("soup", cfg.keyed("soup"), inputs, cfg.run.seed)

    def build() -> None:
        import ray

        connect()
        task = ray.remote(num_cpus=cfg.soup.num_cpus, num_gpus=cfg.soup.num_gpus)(soup_task)
        start = time.time()
        payload = ray.get(task.remote(cfg, base_dir, data_dir, sft_dir))
        write_artifact(cfg, store, key, payload, inputs, time.time() - start)

    path = stage("soup", key, store, build)
    print_summary(store.manifest("soup", key) or {}, store.read_table(path, TRIALS))
    return path


def soup_task(cfg: ExperimentConfig, base_dir: str, data_dir: str, sft_dir: str) -> dict:
    """The Ray task: its inputs copied from the run root to whichever node runs it, then the soup."""
    # Imported here: the module pulls in transformers and TRL, which the driver itself never needs.
    from vlm_posttrain.soup.stage import soup_payload

    return soup_payload(cfg, local_copy(base_dir), local_copy(data_dir), local_copy(sft_dir))


def print_summary(manifest: dict, trials: pd.DataFrame) -> None:
    check, soup = manifest.get("self_check", {}), manifest.get("soup", {})
    ingredients = [i["trial_id"] for i in manifest.get("ingredients", [])]
    # max_deviation is what the check judges; max_rel_error is the distance from the exact mean of the
    # ΔW (the truncation error for delta_svd, the cross-term error for factor_mean, ~0 otherwise).
    print(
        f"soup {soup.get('method')} of {ingredients} (r={soup.get('r')}): self-check "
        f"passed={check.get('passed')}, deviation {check.get('max_deviation', math.nan):.1e}, "
        f"written {check.get('written_rel_error', math.nan):.1e}, "
        f"vs exact mean {check.get('max_rel_error', math.nan):.2e}"
    )
    cols = ["trial_id", "in_soup", "eval_loss", METRIC]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(trials[[c for c in cols if c in trials.columns]].to_string(index=False))


@cli
def main(argv: list[str] | None = None) -> None:
    from ray_jobs import pipeline

    cfg, store = parse_args(__doc__, argv)
    print(pipeline.run(cfg, store, until="soup").soup)


if __name__ == "__main__":
    main()
