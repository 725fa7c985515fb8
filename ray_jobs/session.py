"""What every driver shares: its command line, the Ray connection, skipping finished artifacts, the Tune
``tuner`` (restore or create) and the Ray Data actor-pool options.

A driver connects to the cluster named by ``RAY_ADDRESS`` (as ``ray job submit`` sets it) or starts a
local Ray; either way the workers get ``HF_HUB_OFFLINE`` and the tokenizers setting from this process (never
a token: workers read ``HF_TOKEN`` and cloud credentials from their own node's environment).

Decorate a driver's ``main`` with :func:`cli` so that a problem with the user's input (config, data, model
path, adapters) ends the run with one line, ``error: <what and how to fix it>``, and exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

from vlm_posttrain.config import ConfigError, EvalConfig, ExperimentConfig, PairsConfig, load_config
from vlm_posttrain.store import RunStore

DEFAULT_CONFIG = "configs/tiny.yaml"
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
# Built-in errors count as the user's input problem only when the project's own code raised them.
# Matched as path segments: on a cluster the code runs from Ray's unpacked copy of the working dir.
PROJECT_DIRS = ("/vlm_posttrain/", "/ray_jobs/")
USER_ERROR_TYPES = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)
# The metric a Tune trial reports instead of raising when its input is bad (trainables.stop_on_input_error):
# Tune retries a raised error up to resources.max_failures times, which is for crashes, not for bad input.
INPUT_ERROR = "input_error"


class InputError(ValueError):
    """A problem with the user's input found by a driver, or reported by a trial: one line, exit 2."""


def stop_on_input_error(train: Callable) -> Callable:
    """Decorator for a Tune function trainable: an input problem ends the trial with ``INPUT_ERROR`` reported
    (the driver raises it with :func:`raise_input_errors`) instead of an error Tune would retry; a crash still
    raises, and is retried."""

    @functools.wraps(train)
    def trainable(*args, **kwargs):
        try:
            return train(*args, **kwargs)
        except Exception as err:
            message = user_error(err)
            if message is None:
                raise
            from ray import tune

            tune.report({INPUT_ERROR: message})

    return trainable


def raise_input_errors(results) -> None:
    """Raise the first trial's input problem (a trial reports it as ``INPUT_ERROR`` rather than failing)."""
    for result in results:
        message = (result.metrics or {}).get(INPUT_ERROR)
        if message:
            raise InputError(message)


def parse_cli(
    description: str,
    argv: list[str] | None = None,
    options: Callable[[argparse.ArgumentParser], object] | None = None,
) -> tuple[ExperimentConfig, RunStore, argparse.Namespace]:
    """A driver's one command line: ``CONFIG [key.path=value ...]`` plus the driver's own flags.

    ``options`` adds the driver's flags to the same parser, so ``--help`` lists them; flags may stand anywhere
    among the overrides (``pipeline CONFIG --plan sft.max_length=1024``). Returns the config, its run store and
    every parsed argument (``config``, ``overrides`` and the driver's own).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "config", nargs="?", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. sft.learning_rate=1e-4")
    if options is not None:
        options(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    return cfg, RunStore(cfg.run.root), args


def parse_args(description: str, argv: list[str] | None = None) -> tuple[ExperimentConfig, RunStore]:
    """``CONFIG [key.path=value ...]``: the config and its run store (:func:`parse_cli` without extra flags)."""
    cfg, store, _ = parse_cli(description, argv)
    return cfg, store


def connect() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray on this machine."""
    import ray

    # Tune saves its experiment state (which trials finished) every 10 s by default; a driver killed in that
    # window would make Tuner.restore run finished trials again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Under `ray job submit` the job's --runtime-env-json already reaches every worker, and ray.init refuses
    # to set one of its keys again: those keep the job's value.
    for key in _job_env_vars():
        env.pop(key, None)
    address = os.environ.get("RAY_ADDRESS")
    print(
        f"[ray] {'joining the cluster at ' + address if address else 'starting a local Ray'}", file=sys.stderr
    )
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)


def tuner(
    stage_name: str,
    key: str,
    store: RunStore,
    trainable,
    cfg: ExperimentConfig,
    gpus: float,
    checkpoint_config,
    param_space: dict | None = None,
    tune_config=None,
):
    """Ray Tune's Tuner for a stage's trials (``resources.cpus_per_trial``, ``gpus``, ``max_failures``),
    restored from the stage's Tune state when an interrupted run left one (finished trials are kept,
    unfinished ones resume from their last checkpoint), else new."""
    from ray import tune

    trainable = tune.with_resources(trainable, {"cpu": cfg.resources.cpus_per_trial, "gpu": gpus})
    path = store.tune_experiment(stage_name, key)
    if tune.Tuner.can_restore(path):
        print(f"[{stage_name}] resuming Tune experiment {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space or {},
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=store.artifact_id(stage_name, key),
            storage_path=store.tune_storage(stage_name),
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=checkpoint_config,
            callbacks=tracking_callbacks(cfg, stage_name, key, store),
            verbose=1,
        ),
    )


def tracking_callbacks(cfg: ExperimentConfig, stage_name: str, key: str, store: RunStore) -> list:
    """Ray Tune's MLflow logger for a stage's trials when ``tracking.backend`` is mlflow: one MLflow run per
    trial (params: the trial's config; metrics: every reported step), tagged with the run root and artifact."""
    if cfg.tracking.backend != "mlflow":
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from analysis.tracking import TAG_ARTIFACT, TAG_ROOT, TAG_STAGE, experiment_name, root_tag

    tags = {
        TAG_ROOT: root_tag(store.root),
        TAG_STAGE: stage_name,
        TAG_ARTIFACT: store.artifact_id(stage_name, key),
    }
    return [
        MLflowLoggerCallback(
            tracking_uri=cfg.tracking.tracking_uri, experiment_name=experiment_name(cfg), tags=tags
        )
    ]


def actor_options(p: PairsConfig | EvalConfig) -> dict:
    """``map_batches`` options of a stage's actor pool: ``actors``, ``batch_size``, ``num_cpus``, ``num_gpus``."""
    import ray

    # Pool actors get Ray Data's max_restarts=-1 and max_task_retries=-1: a dead actor is restarted and the
    # batches it held are retried, so no row is lost (tests/test_cluster.py kills both pools mid-run). Not
    # passed here: map_batches takes them only through the **ray_remote_args that Ray 2.64 removes.
    options = {
        "compute": ray.data.ActorPoolStrategy(size=p.actors),
        "batch_size": p.batch_size,
        "batch_format": "pandas",
        "num_cpus": p.num_cpus,
    }
    if p.num_gpus > 0:
        options["num_gpus"] = p.num_gpus
    return options


def _job_env_vars() -> dict:
    """The env vars of the submitted job's runtime env (empty outside ``ray job submit``)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def stage(name: str, key: str, store: RunStore, run: Callable[[], object]) -> str:
    """Run a stage unless its artifact is already complete; returns the artifact path."""
    if store.manifest(name, key) is not None:
        print(f"[{name}] {name}-{key} already complete, skipped", file=sys.stderr)
        return store.artifact_path(name, key)
    print(f"[{name}] building {name}-{key}", file=sys.stderr)
    start = time.time()
    try:
        run()
    except BaseException:
        # A failed build leaves no half-made folder behind (a killed one leaves only a hidden staging folder).
        store.discard_staging(name, key)
        raise
    print(f"[{name}] done in {time.time() - start:.1f}s -> {store.artifact_path(name, key)}", file=sys.stderr)
    return store.artifact_path(name, key)


def user_error(err: BaseException) -> str | None:
    """The one-line message for a problem with the user's input, or None for a bug (which keeps its traceback).

    Input problems are the project's own error types (``ConfigError``, ``DataError``, ``ModelLoadError``, ...)
    and ``ValueError``/``FileNotFoundError`` raised by the project's code; a Ray task's or trial's error
    counts by the error it wraps.
    """
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        return user_error(cause) or _remote_user_error(err, cause)
    if type(err).__module__.startswith("ray.") and isinstance(err.__cause__, BaseException):
        return user_error(err.__cause__)  # Ray Data raises a UDF's error as the cause of its own
    if (
        isinstance(err, InputError)
        or type(err).__module__.split(".")[0] == "vlm_posttrain"
        or (isinstance(err, USER_ERROR_TYPES) and _raised_by_project(err))
    ):
        return " ".join(str(err).split())
    return None


def _raised_by_project(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and _is_project_file(frames[-1].filename)


def _is_project_file(path: str) -> bool:
    return any(d in path.replace("\\", "/") for d in PROJECT_DIRS)


def _remote_user_error(err: BaseException, cause: BaseException) -> str | None:
    # A remote error's own traceback is gone; Ray keeps it as text, last frame last.
    lines = [line for line in str(getattr(err, "traceback_str", "")).splitlines() if 'File "' in line]
    if isinstance(cause, USER_ERROR_TYPES) and lines and _is_project_file(lines[-1]):
        return " ".join(str(cause).split())
    return None


def cli(main: Callable) -> Callable:
    """Decorator for a driver's ``main``: input problems print ``error: <message>`` and exit 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            message = user_error(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
