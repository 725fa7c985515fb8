"""Ray Tune's overhead on the SFT grid: a 4-trial tiny grid under Ray Tune (the project's driver code,
``ray_jobs.sft.make_tuner``) against the same four trainings run one after another in one process.

Each side runs in a fresh Python process, timed from its first line, so imports, ``ray.init``, worker
start-up and every trial are in; the sides alternate over the repeats. The serial side trains with one
torch thread by default, as each Ray trial does (``cpus_per_trial: 1``): Ray runs two trials at once on the
two cores, so with no overhead at all it would take half the serial time. (A 2-thread process on a shared
2-core machine stalls whenever another process holds a core: up to 10x slower here, so not the default.) Both train the same tiny LLaVA
(random weights) on the same synthetic split with the same four grid points (lora_alpha x lora_dropout),
evaluating each epoch as trials do. ``ray-lean`` is the same grid with what could still be cut outside the
driver code: Ray's dashboard and Tune's automatic result loggers. (The cut this benchmark led to is in
``make_tuner``: CPU trials reuse their worker process, so 4 trials on 2 lanes import torch/TRL twice, not 4
times; ``trial_processes`` in the table shows it.)

    python -m benchmarks.grid [--repeats 2] [--examples 96] [--epochs 1] [--sides serial,ray,ray-lean] [--out FILE]
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any heavy import: the child's cold start counts

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, median, offline_env, parser, print_table, report  # noqa: E402

GRID = {"lora_alpha": [16, 8], "lora_dropout": [0.05, 0.1]}
SIDES = ("serial", "ray", "ray-lean")
EXTRA_SIDES = ("ray-noreuse",)  # the driver before its cut: a new worker process (and its imports) per trial


def build_parser():
    p = parser("grid", __doc__)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternated")
    p.add_argument("--examples", type=int, default=96, help="synthetic charts (80%% train, 10%% val)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument(
        "--sides", default=",".join(SIDES), help="comma-separated subset of " + ", ".join(SIDES + EXTRA_SIDES)
    )
    p.add_argument(
        "--serial-threads",
        type=int,
        default=1,
        help="torch threads of the serial side (default 1, as each Ray trial with cpus_per_trial=1 gets; "
        "0 = torch's default, all cores)",
    )
    p.add_argument("--side", help=argparse.SUPPRESS, default=None)  # internal: run one side in this process
    p.add_argument("--work", help=argparse.SUPPRESS, default=None)
    return p


def experiment(root: Path, epochs: float):
    """configs/tiny.yaml with the 4-point grid, 2 trials at a time on 1 CPU each, its run root at ``root``."""
    from vlm_posttrain.config import load_config

    overrides = [
        f"run.root={root}",
        f"sft.epochs={epochs}",
        f"sft.grid={json.dumps(GRID)}",
        "resources.cpus_per_trial=1",
        "resources.max_concurrent_trials=2",
    ]
    return load_config(REPO / "configs" / "tiny.yaml", overrides)


def prepare(work: Path, examples: int) -> None:
    """The base model and the data split both sides train on."""
    from vlm_posttrain.config import DataConfig
    from vlm_posttrain.data import build_splits
    from vlm_posttrain.tiny import build_tiny_llava

    build_tiny_llava(work / "model")
    cfg = DataConfig(source="synthetic", limit=examples, synthetic_image_size=64)
    build_splits(cfg, 0, work / "data")


def run_serial(work: Path, root: Path, epochs: float, threads: int) -> dict:
    import torch

    from vlm_posttrain.sft import train_trial

    if threads:
        torch.set_num_threads(threads)

    cfg = experiment(root, epochs)
    imported = time.time()
    trials = []
    for i, trial in enumerate(cfg.sft.trials()):
        start = time.time()
        train_trial(trial, cfg.model, work / "model", work / "data", root / f"trial-{i}", cfg.run.seed)
        trials.append(time.time() - start)
    return {"imports_s": imported - STARTED, "trial_s": trials}


def run_ray(work: Path, root: Path, epochs: float, lean: bool, reuse: bool = True) -> dict:
    import ray

    from ray_jobs import sft as sft_job
    from ray_jobs.session import connect
    from vlm_posttrain.store import RunStore

    cfg = experiment(root, epochs)
    imported = time.time()
    if not reuse:
        from ray import tune

        original = tune.TuneConfig
        tune.TuneConfig = lambda **kw: original(**{**kw, "reuse_actors": False})  # what make_tuner set before
    if lean:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        connect()  # the project's own: what `make run` does
    started = time.time()
    tuner = sft_job.make_tuner(
        cfg, RunStore(cfg.run.root), f"bench-{lean}", str(work / "model"), str(work / "data")
    )
    results = tuner.fit()
    fitted = time.time()
    trials = [r.metrics["time_total_s"] for r in results]
    pids = sorted({r.metrics.get("pid") for r in results})
    ray.shutdown()
    return {
        "imports_s": imported - STARTED,
        "ray_init_s": started - imported,
        "fit_s": fitted - started,
        "trial_s": trials,
        "trial_processes": len(pids),
        "shutdown_s": time.time() - fitted,
    }


def child(side: str, work: Path, epochs: float, threads: int) -> None:
    offline_env()
    root = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=work))
    if side == "serial":
        out = run_serial(work, root, epochs, threads)
    else:
        out = run_ray(work, root, epochs, lean=side == "ray-lean", reuse=side != "ray-noreuse")
    out["total_s"] = time.time() - STARTED
    print("RESULT " + json.dumps(out))


def run_side(side: str, work: Path, epochs: float, threads: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.grid", "--side", side, "--work", str(work)]
    cmd += ["--epochs", str(epochs), "--serial-threads", str(threads)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.time() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    return {"side": side, "wall_s": wall, **result, "trial_sum_s": sum(result["trial_s"])}


def summarize(runs: list[dict], sides: list[str]) -> dict:
    wall = {s: median(r["wall_s"] for r in runs if r["side"] == s) for s in sides}
    summary: dict = {f"{s}_wall_s": w for s, w in wall.items()}
    for s in sides:
        if s != "serial" and "serial" in wall:
            summary[f"{s}_over_serial"] = wall[s] / wall["serial"]
        mine = [r for r in runs if r["side"] == s]
        for key in ("imports_s", "ray_init_s", "fit_s", "trial_sum_s", "trial_processes"):
            if key in mine[0]:
                summary[f"{s}_{key}"] = median(r[key] for r in mine)
        if s != "serial":
            # What Tune spends in fit besides training: worker start-up and imports, scheduling,
            # checkpoint syncing (the trials ran on 2 lanes).
            summary[f"{s}_fit_overhead_s"] = median(r["fit_s"] - r["trial_sum_s"] / 2 for r in mine)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.side:
        child(args.side, Path(args.work), args.epochs, args.serial_threads)
        return 0
    offline_env()
    sides = [s for s in args.sides.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    prepare(work, args.examples)
    runs = []
    for i in range(args.repeats):
        order = sides if i % 2 == 0 else sides[::-1]  # alternate, so drift in load hits every side alike
        for side in order:
            runs.append({"repeat": i, **run_side(side, work, args.epochs, args.serial_threads)})
            print_table(runs[-1:], [k for k in runs[-1] if k != "trial_s"])
    summary = summarize(runs, sides)
    print()
    print_table([{"figure": k, "value": v} for k, v in summary.items()], ["figure", "value"])
    report(
        "grid",
        args.out,
        runs,
        summary,
        config={k: v for k, v in vars(args).items() if k not in ("out", "side", "work")},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
