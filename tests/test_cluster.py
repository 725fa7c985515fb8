"""The project on a real Ray cluster with its run root in a bucket: ``ray job submit``, two nodes, a killed
trial, a killed driver, killed Ray Data actors.

One cluster on 127.0.0.1 for the module: a head with no CPUs (like cluster.yaml's head: drivers only) and a
second node (``ray start --address``) with the CPUs, so every trial, task and actor must run there. No shared
filesystem: the run root is ``s3://`` on a local S3 server (moto on loopback, tests/bucket_servers.py), and each
node has a temp folder of its own (TMPDIR), so a node sees only what it fetches from the bucket itself.
Credentials and the endpoint reach the nodes through their environment only (as an instance role would),
never through the config or the job's runtime env. Token auth with a fresh token in the environment of every
node and CLI call; planted HF/cloud tokens (the S3 secret is one) must never reach a run root or a driver's
output. Stopped by its own processes at the end (tests/ray_cluster.py).

Two runs of the same config: the README's ``ray job submit`` command for the whole experiment, uninterrupted,
and a run of the SFT grid that loses a trial's worker process and then its driver (both SIGKILL) and is
finished by the same command again. Then the pairs stage on that first run's artifacts, its Ray Data actors
(both pools) SIGKILLed mid-pipeline. Each fault test prints a line ``fault-injection: ...`` (faults tried,
survived, rows lost).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.bucket_servers import LocalS3
from tests.ray_cluster import REPO, LocalRayCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CONFIG = "configs/tiny.yaml"
BUCKET = "vpr-cluster-test"
# The tiny config made small: a quick tiny base, 40 charts, two trials (lora_alpha 16, 8) of three short
# epochs, so a trial killed after its first epoch's checkpoint still has two to go.
SMALL = [
    "model.tiny_pretrain_examples=16",
    "model.tiny_pretrain_epochs=1",
    "data.limit=40",
    "data.synthetic_families=[]",
    "sft.epochs=3",
    "sft.grid.lora_dropout=[0.05]",
    "sft.batch_size=2",
    "resources.max_concurrent_trials=2",
    "resources.max_failures=1",
]
# The later stages made small for the submitted whole experiment (pairs from 36 prompts, DPO, eval of 4 charts).
LATER = [
    "pairs.k=3",
    "pairs.max_new_tokens=8",
    "pairs.batch_size=16",
    "dpo.epochs=1",
    "dpo.batch_size=1",
    "dpo.warmup_ratio=0",
    "dpo.holdout_fraction=0",
    "eval.limit=4",
    "eval.max_new_tokens=6",
]
DRIVER = "ray_jobs.sft"
PLANTED = {
    "HF_TOKEN": "hf_PLANTEDtokenNEVERwrite0123456789",
    "AWS_SECRET_ACCESS_KEY": "PLANTEDcloudSECRET9876",
}
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
STAGES = ["data", "dpo", "eval", "model", "pairs", "report", "sft", "soup"]


@pytest.fixture(scope="module")
def s3():
    # moto takes any keys: the planted secret is the key, so the checks below show the real one never leaks.
    with LocalS3(secret=PLANTED["AWS_SECRET_ACCESS_KEY"]) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def cluster(s3):
    with LocalRayCluster(env={**PLANTED, **s3.env}) as c:
        c.start_head(num_cpus=0)
        c.add_node(num_cpus=2)
        yield c


def artifacts(root: Path) -> dict[str, dict]:
    """Every registered artifact under a (mirrored) run root: {artifact id: manifest}."""
    found = {}
    for manifest in root.glob("*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        if data.get("status") == "complete" and not manifest.parent.name.startswith("."):
            found[data["artifact"]] = data
    return found


def partial_artifacts(root: Path) -> list[Path]:
    """Folders in a stage's place that are not complete artifacts (staging, an unfinished upload)."""
    return [
        p
        for p in root.glob("*/*")
        if p.name != "_tune"
        and (".tmp" in p.name or not (p / "manifest.json").is_file() or p.name not in artifacts(root))
    ]


def trial_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("sft/_tune/sft-*/train_sft_*"))


def results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(trial_dir: Path) -> bool:
    # The trainable's last report carries train_examples; earlier ones do not.
    return any("train_examples" in r for r in results(trial_dir))


def trial_states(root: Path) -> dict[str, str]:
    """Trial id -> status in Tune's saved experiment state (what a restore would see)."""
    states = {}
    for path in root.glob("sft/_tune/sft-*/experiment_state-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            states[trial["trial_id"]] = trial["status"]
    return states


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def driver_env(cluster: LocalRayCluster) -> dict:
    return {**cluster.env, "RAY_ADDRESS": cluster.address}


def driver_cmd(root: str, *overrides: str, driver: str = DRIVER) -> list[str]:
    return [sys.executable, "-m", driver, CONFIG, f"run.root={root}", *SMALL, *overrides]


def assert_no_planted_tokens(root: Path, *texts: str) -> None:
    """Tokens are read from the environment only: none may appear in a run root or a driver's output."""
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for token in PLANTED.values():
                assert token.encode() not in data, f"planted token written to {path}"
    for text in texts:
        for token in PLANTED.values():
            assert token not in text, "planted token in a driver's output"


def fault_summary(capsys, name: str, tried: int, survived: int, rows_lost: int, **extra) -> None:
    """One line on the terminal, past pytest's capture, so CI logs show what was injected and what survived."""
    details = " ".join(f"{k}={v}" for k, v in extra.items())
    with capsys.disabled():
        print(
            f"\nfault-injection: {name}: faults tried={tried} survived={survived} rows lost={rows_lost} {details}"
        )


def in_cluster(cluster: LocalRayCluster, pid: int) -> bool:
    """Whether a pid belongs to this test's nodes (the tests kill only processes they started)."""
    ours = {p.pid for p in cluster.nodes}
    ours |= {c.pid for p in cluster.nodes for c in psutil.Process(p.pid).children(recursive=True)}
    return pid in ours


def copy_first_stages(
    s3: LocalS3, source: dict, root: str, stages: tuple[str, ...] = ("model", "data")
) -> None:
    """The finished artifacts of another run's first stages (same config sections, so the same ids)."""
    for artifact_id in source["artifacts"]:
        stage = artifact_id.split("-")[0]
        if stage in stages:
            s3.copy(f"{source['root']}/{stage}/{artifact_id}", f"{root}/{stage}/{artifact_id}")


def cached_artifacts(folder: Path) -> set[str]:
    """The artifacts a node copied from the bucket into its own cache (``store.local_copy``)."""
    return {p.parent.name for p in folder.glob("vlm_posttrain_cache/s3/**/manifest.json")}


@pytest.fixture(scope="module")
def submitted(cluster, s3, tmp_path_factory):
    """The README's `ray job submit` command for the whole experiment, uninterrupted, on the two-node cluster,
    with the run root in the bucket."""
    root = f"s3://{BUCKET}/submitted/run"
    job_id = f"vpr-test-{os.getpid()}-{time.time_ns()}"
    out = cluster.ray(
        "job",
        "submit",
        f"--address={cluster.dashboard_url}",
        "--no-wait",
        f"--submission-id={job_id}",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}),
        "--",
        "python",
        "-m",
        "ray_jobs.pipeline",
        CONFIG,
        f"run.root={root}",
        *SMALL,
        *LATER,
    )
    assert out.returncode == 0, out.stdout + out.stderr

    def status():
        state = cluster.api(f"/api/jobs/{job_id}")["status"]
        return state if state in ("SUCCEEDED", "FAILED", "STOPPED") else None

    state = wait_for(status, 600, f"job {job_id}")
    logs = cluster.api(f"/api/jobs/{job_id}/logs")["logs"]
    # Credentials reach the nodes through their own environment: the job's runtime env carries none.
    runtime_env = json.dumps(cluster.api(f"/api/jobs/{job_id}")["runtime_env"])
    assert "AWS_" not in runtime_env and PLANTED["AWS_SECRET_ACCESS_KEY"] not in runtime_env, runtime_env
    view = s3.mirror(root, tmp_path_factory.mktemp("submitted") / "run")
    return {"root": root, "view": view, "state": state, "logs": logs, "artifacts": artifacts(view)}


def test_job_submit_runs_every_stage_on_a_bucket_root(submitted, s3, monkeypatch):
    assert submitted["state"] == "SUCCEEDED", submitted["logs"][-4000:]
    logs, view, root = submitted["logs"], submitted["view"], submitted["root"]
    assert "[ray] joining the cluster at 127.0.0.1:" in logs
    assert sorted(a.split("-")[0] for a in submitted["artifacts"]) == STAGES
    assert f"run root: {root}" in logs and f"report: {root}/report/report-" in logs
    (sft,) = view.glob("sft/sft-*")
    table = pd.read_parquet(sft / "trials.parquet")
    assert sorted(table["config/lora_alpha"]) == [8, 16]
    for adapter in table["adapter"]:
        assert (sft / adapter / "adapter_model.safetensors").is_file()
    # Stages name their inputs by the bucket's URIs, never by a node's local copy.
    (dpo,) = (m for a, m in submitted["artifacts"].items() if a.startswith("dpo-"))
    assert all(v.startswith(f"{root}/") for v in dpo["inputs"].values()), dpo["inputs"]
    assert dpo["path"].startswith(f"{root}/dpo/dpo-")
    assert not partial_artifacts(view)
    assert_no_planted_tokens(view, logs)
    # The results load into pandas in one call, from the bucket itself (endpoint and keys from the environment).
    from analysis.run import load_run

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    run = load_run(root)
    assert {"base", "soup/delta_mean", "dpo/round1"} <= set(run.eval["variant"]) and len(run.trials) == 3


def test_trials_ran_on_the_second_node(cluster, submitted):
    nodes = cluster.alive_nodes()
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    second = next(n["node_id"] for n in nodes if not n["is_head_node"])
    actors = cluster.api("/api/v0/actors?detail=true&limit=1000")["data"]["result"]["result"]
    trials = [a for a in actors if a["class_name"].endswith("ImplicitFunc")]
    pools = [a for a in actors if a["class_name"].startswith("MapWorker(")]
    # Two SFT trials and the DPO trial; the pairs generator and judge and the eval answerer.
    assert len(trials) == 3 and len(pools) >= 3, (trials, pools)
    assert all(a["node_id"] == second for a in trials + pools), (head, second, trials, pools)
    # The results reached the bucket: the trial table, each trial's adapter and Tune's state.
    view = submitted["view"]
    (sft,) = view.glob("sft/sft-*")
    assert len(pd.read_parquet(sft / "trials.parquet")) == 2
    assert len(trial_dirs(view)) == 2
    assert all(list(d.glob("checkpoint_*")) for d in trial_dirs(view))
    # No shared disk: the second node fetched what its trials and actors loaded from the bucket into its
    # own temp folder. The driver, on the head, copied only what it reads itself (the processor, the splits,
    # the pairs it checks); tables it reads in place, and no adapter at all.
    fetched = cached_artifacts(cluster.node_tmp("node1"))
    ids = {a.split("-")[0]: a for a in submitted["artifacts"]}
    assert {ids["model"], ids["data"], ids["sft"], ids["soup"], ids["pairs"], ids["dpo"]} <= fetched, fetched
    on_head = cached_artifacts(cluster.node_tmp("head"))
    assert ids["model"] in on_head and not on_head & {ids["sft"], ids["soup"], ids["dpo"]}, on_head
    # Every connection of this cluster's processes stays on loopback.
    procs = [psutil.Process(p.pid) for p in cluster.nodes]
    procs += [c for p in list(procs) for c in p.children(recursive=True)]
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in conns:
            assert not conn.raddr or conn.raddr.ip in LOOPBACK, (proc.name(), conn)


@pytest.fixture(scope="module")
def interrupted(cluster, s3, submitted, tmp_path_factory):
    """The same run with two faults: a trial's worker killed after its first checkpoint, then the driver killed
    after that trial finished, while the second one trains; then the same command again."""
    work = tmp_path_factory.mktemp("interrupted")
    root = f"s3://{BUCKET}/interrupted/run"
    copy_first_stages(s3, submitted, root)  # saves building the tiny base again

    def view() -> Path:
        return s3.mirror(root, work / "view")

    # One trial at a time, so the first one finishes while the second one is still to run.
    cmd = driver_cmd(root, "resources.max_concurrent_trials=1")
    with open(work / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=driver_env(cluster), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            trial_fault = kill_a_trial_worker(cluster, view, first)
            (done_dir,) = wait_for(
                lambda: mid_grid(view()), 240, "one finished trial, the other one to run", first
            )
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
    killed_view = view()
    done = done_dir.relative_to(work / "view")
    done_rows = len(results(killed_view / done))
    killed = {"artifacts": set(artifacts(killed_view)), "sft_keys": s3.listing(f"{root}/sft")}
    again = subprocess.run(
        cmd, env=driver_env(cluster), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    final = s3.mirror(root, work / "final")
    return {
        "root": root,
        "view": final,
        "trial_fault": {
            **trial_fault,
            "trial_dir": final / trial_fault["trial_dir"].relative_to(work / "view"),
        },
        "done_dir": final / done,
        "done_rows": done_rows,
        "killed": killed,
        "rerun": again,
        "first_log": (work / "first.log").read_text(),
    }


def kill_a_trial_worker(cluster: LocalRayCluster, view, driver: subprocess.Popen) -> dict:
    """SIGKILL the running trial's worker process right after its first checkpoint."""

    def first_checkpoint():
        # Registered by the driver (in result.json, synced to the bucket), not just written: a checkpoint the
        # driver has not yet heard of when the worker dies cannot be restored, and the trial would start over.
        return next(
            (d for d in trial_dirs(view()) if any(r.get("checkpoint_dir_name") for r in results(d))), None
        )

    trial_dir = wait_for(first_checkpoint, 240, "a trial's first checkpoint", driver)
    pid = results(trial_dir)[0]["pid"]
    assert in_cluster(cluster, pid) and not finished(trial_dir), "the trial must still be training"
    os.kill(pid, signal.SIGKILL)
    return {"trial_dir": trial_dir, "pid": pid, "killed_at": time.time()}


def mid_grid(root: Path) -> list[Path] | None:
    """The finished trial's folder once one trial is done (and saved as such) and the other is not."""
    dirs, states = trial_dirs(root), trial_states(root)
    done = [d for d in dirs if finished(d) and states.get(results(d)[-1]["trial_id"]) == "TERMINATED"]
    return done if len(dirs) == 2 and len(done) == 1 else None


def test_killed_trial_worker_restarts_from_its_checkpoint(interrupted, capsys):
    """The trial whose worker died went on from its last checkpoint in a new process (resources.max_failures)."""
    fault = interrupted["trial_fault"]
    rows = results(fault["trial_dir"])
    pids = list(dict.fromkeys(r["pid"] for r in rows))
    assert pids[0] == fault["pid"] and len(pids) == 2, pids  # one restart, in a new process
    checkpoint_step = max(
        r["step"] for r in rows if r["pid"] == fault["pid"] and r.get("checkpoint_dir_name")
    )
    restarted = [r for r in rows if r["pid"] == pids[1]]
    # Resumed from the checkpoint: the new process's first step is past it, not step 1 again.
    assert min(r["step"] for r in restarted if "step" in r) > checkpoint_step
    assert restarted[-1]["epoch"] == 3 and "train_examples" in restarted[-1]
    fault_summary(
        capsys,
        "trial worker SIGKILL after its first checkpoint",
        tried=1,
        survived=1,
        rows_lost=0 if finished(fault["trial_dir"]) else 1,
        resumed_after_step=checkpoint_step,
    )


def test_killed_driver_resumes_without_retraining(interrupted, submitted, capsys):
    """SIGKILL of the driver mid-grid; the same command again skips finished stages and trials and ends in the
    uninterrupted run's artifacts, with nothing half-written listed in the bucket at any point."""
    view, again = interrupted["view"], interrupted["rerun"]
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    # While the driver lay dead, the bucket listed model and data alone: no SFT artifact, not even a partial one.
    killed = interrupted["killed"]
    assert sorted(a.split("-")[0] for a in killed["artifacts"]) == ["data", "model"]
    assert all(k.startswith("_tune/") for k in killed["sft_keys"]), killed["sft_keys"]
    assert "[model] model-" in output and "[data] data-" in output and "already complete, skipped" in output
    assert f"resuming Tune experiment {interrupted['root']}/sft/_tune/sft-" in output
    assert len(results(interrupted["done_dir"])) == interrupted["done_rows"], "a finished trial trained again"

    resumed = artifacts(view)
    first_stages = {
        a: m for a, m in submitted["artifacts"].items() if a.split("-")[0] in ("model", "data", "sft")
    }
    assert set(resumed) == set(first_stages)
    for artifact_id, manifest in resumed.items():
        assert manifest["config"] == first_stages[artifact_id]["config"]
    (sft,) = view.glob("sft/sft-*")
    (reference,) = submitted["view"].glob("sft/sft-*")
    table, expected = pd.read_parquet(sft / "trials.parquet"), pd.read_parquet(reference / "trials.parquet")
    assert sorted(table["config/lora_alpha"]) == sorted(expected["config/lora_alpha"])
    assert table["eval_loss"].notna().all() and (table["epoch"] == 3).all()
    assert not partial_artifacts(view)

    def data_rows(arts: dict) -> int:
        return sum(next(m for a, m in arts.items() if a.startswith("data-"))["metrics"]["rows"].values())

    rows_lost = (len(expected) - len(table)) + (data_rows(submitted["artifacts"]) - data_rows(resumed))
    assert rows_lost == 0
    assert_no_planted_tokens(view, output, interrupted["first_log"])
    fault_summary(
        capsys,
        "driver SIGKILL mid-grid (bucket run root)",
        tried=1,
        survived=1,
        rows_lost=rows_lost,
        finished_trials_retrained=0,
    )


# Ray Data's actor class for map_batches(<class>) on an actor pool is MapWorker(<operator name>).
GENERATOR_POOL = "MapWorker(MapBatches(GenerateAnswers))"
JUDGE_POOL = "MapWorker(MapBatches(JudgeAnswers))"
# Every train prompt, one per batch: the generator still has most of its batches to go when the state API
# reports its first one finished (task events reach it about a second late).
PAIRS_SMALL = ["pairs.limit=0", "pairs.batch_size=1", "pairs.actors=1"]


def ray_state(cluster: LocalRayCluster, kind: str, detail: bool = False) -> list[dict]:
    """Rows of the state API: ``actors`` or ``tasks`` of every job on the cluster."""
    path = f"/api/v0/{kind}?detail={str(detail).lower()}&limit=10000"
    return cluster.api(path)["data"]["result"]["result"]


def pool_tasks(tasks: list[dict], actor_id: str) -> list[dict]:
    """The batches (``submit`` calls, every attempt) sent to one pool actor."""
    return [t for t in tasks if t.get("actor_id") == actor_id and t["name"].endswith(".submit")]


def kill_ray_data_actors(cluster: LocalRayCluster, driver: subprocess.Popen) -> dict:
    """SIGKILL the worker process of both pools' actors once the generator has finished a batch."""

    def mid_pipeline():
        try:
            actors, tasks = ray_state(cluster, "actors"), ray_state(cluster, "tasks")
        except (OSError, ValueError):
            return None  # the dashboard is busy: ask again
        alive = {a["class_name"]: a for a in actors if a["state"] == "ALIVE"}
        if GENERATOR_POOL not in alive or JUDGE_POOL not in alive:
            return None
        done = [t for t in pool_tasks(tasks, alive[GENERATOR_POOL]["actor_id"]) if t["state"] == "FINISHED"]
        return ([alive[GENERATOR_POOL], alive[JUDGE_POOL]], len(done)) if done else None

    actors, batches_done = wait_for(mid_pipeline, 300, "the generator pool's first finished batch", driver)
    assert all(in_cluster(cluster, a["pid"]) for a in actors), actors
    running = driver.poll() is None
    for actor in actors:
        os.kill(actor["pid"], signal.SIGKILL)
    return {
        "actors": actors,
        "batches_done": batches_done,
        "driver_running": running,
        "killed_at": time.time(),
    }


def test_killed_ray_data_actors_lose_no_rows(cluster, s3, submitted, tmp_path, capsys):
    """The pairs stage with its generator and judge actors SIGKILLed mid-pipeline: Ray restarts both
    (Ray Data's max_restarts=-1), retries the batches they held (max_task_retries=-1), and the artifact has every input
    prompt exactly once."""
    root = f"s3://{BUCKET}/pairs-faults/run"
    copy_first_stages(s3, submitted, root, ("model", "data", "sft"))  # pairs is the only stage to run
    cmd = driver_cmd(root, *PAIRS_SMALL, driver="ray_jobs.pairs")
    with open(tmp_path / "pairs.log", "w") as log:
        driver = subprocess.Popen(
            cmd, env=driver_env(cluster), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            fault = kill_ray_data_actors(cluster, driver)
            try:
                driver.wait(300)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    "the pairs driver still runs 300s after its actors were killed"
                ) from None
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    output = (tmp_path / "pairs.log").read_text()
    assert driver.returncode == 0, output[-4000:]
    assert fault["driver_running"], "the actors must be killed while the pipeline runs"
    for stage in ("model", "data", "sft"):
        assert re.search(rf"\[{stage}\] {stage}-\w+ already complete, skipped", output), (
            f"{stage} was rebuilt"
        )
    # Each killed actor came back: same actor, a new worker process.
    killed = {a["actor_id"]: a for a in fault["actors"]}
    after = {a["actor_id"]: a for a in ray_state(cluster, "actors", detail=True) if a["actor_id"] in killed}
    restarted = [i for i, a in after.items() if int(a["num_restarts"]) >= 1 and a["pid"] != killed[i]["pid"]]

    # A batch a killed actor held when it died ran again (so the kill was mid-pipeline, not after the last
    # batch); task events reach the state API a little after the tasks end. Usually both pools retry; the
    # generator alone can be between batches at the kill (a full-suite run on 2026-12-01 saw no generator
    # retry), so either counts.
    def some_retried():
        return [
            t for i in killed for t in pool_tasks(ray_state(cluster, "tasks"), i) if t["attempt_number"] >= 1
        ]

    wait_for(some_retried, 120, "a retried attempt of a batch a killed actor held")
    tasks = [t for i in killed for t in pool_tasks(ray_state(cluster, "tasks"), i)]
    retried = {t["task_id"] for t in tasks if t["attempt_number"] >= 1 and t["state"] == "FINISHED"}

    # Rows: every train prompt judged exactly once (samples.parquet holds k rows per judged prompt).
    view = s3.mirror(root, tmp_path / "view")
    (pairs_dir,) = view.glob("pairs/pairs-*")
    manifest = artifacts(view)[pairs_dir.name]
    (train,) = view.glob("data/data-*/train.parquet")
    expected = pd.read_parquet(train, columns=["example_id"])["example_id"].astype(str)
    assert expected.is_unique and len(expected) > fault["batches_done"]
    k = manifest["config"]["k"]
    samples = pd.read_parquet(pairs_dir / "samples.parquet")
    per_prompt = samples["example_id"].astype(str).value_counts()
    lost = sorted(set(expected) - set(per_prompt.index))
    duplicated = sorted(i for i, n in per_prompt.items() if n > k)
    fault_summary(
        capsys,
        "Ray Data actor SIGKILL mid-pipeline (generator + judge pools)",
        tried=len(killed),
        survived=len(restarted),
        rows_lost=len(lost),
        duplicated=len(duplicated),
        prompts=f"{manifest['metrics']['prompts']}/{len(expected)}",
        generator_batches_done_at_kill=f"{fault['batches_done']}/{len(expected)}",
        batches_retried=len(retried),
    )
    assert len(restarted) == len(killed) == 2, (killed, after)
    assert not lost and not duplicated, (lost, duplicated)
    assert set(per_prompt.index) == set(expected) and (per_prompt == k).all()
    assert not samples.duplicated(["example_id", "sample"]).any()
    assert manifest["metrics"]["prompts"] == len(expected)
    assert not partial_artifacts(view)
    assert_no_planted_tokens(view, output)
