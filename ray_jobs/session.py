"""What every driver shares: its command line, the Ray connection, and skipping finished artifacts.

A driver connects to the cluster named by ``RAY_ADDRESS`` (as ``ray job submit`` sets it) or starts a
local Ray; either way the workers get ``HF_HUB_OFFLINE`` and the tokenizers setting from this process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from vlm_posttrain.config import ConfigError, ExperimentConfig, load_config
from vlm_posttrain.store import RunStore

DEFAULT_CONFIG = "configs/tiny.yaml"
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")


def parse_args(description: str, argv: list[str] | None = None) -> tuple[ExperimentConfig, RunStore]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "config", nargs="?", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. sft.learning_rate=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    return cfg, RunStore(cfg.run.root)


def connect() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env}, log_to_driver=True)


def stage(name: str, key: str, store: RunStore, run: Callable[[], object]) -> str:
    """Run a stage unless its artifact is already complete; returns the artifact path."""
    if store.manifest(name, key) is not None:
        print(f"[{name}] {name}-{key} already complete, skipped", file=sys.stderr)
        return store.artifact_path(name, key)
    print(f"[{name}] building {name}-{key}", file=sys.stderr)
    start = time.time()
    run()
    print(f"[{name}] done in {time.time() - start:.1f}s -> {store.artifact_path(name, key)}", file=sys.stderr)
    return store.artifact_path(name, key)
