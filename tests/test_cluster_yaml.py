"""cluster.yaml: valid for Ray's cluster launcher, and keeps the invariants a real cluster needs.

Pinned code on every node; HF_HUB_OFFLINE only in the workers' `ray start` (they read a model cache filled
during setup); the run root either on an EFS filesystem every node mounts or in a bucket every node reaches
with its instance role, chosen by one switch (EFS as shipped); the dashboard on the head's loopback; token
auth everywhere; no secret in the file.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = "/shared"
SWITCH = "EFS_ID=fs-REPLACE_ME"  # the storage switch as shipped; EFS_ID=none selects a bucket run root
PROFILE = re.compile(r"^(\s*)# (IamInstanceProfile: .*# bucket root: uncomment)$", re.MULTILINE)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _commands(cluster: dict, *keys: str) -> str:
    return "\n".join(line for key in keys for line in cluster.get(key) or [])


def test_ray_launcher_accepts_it(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # Ray's own schema; raises on a missing or unknown key
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type"):
        assert key in cluster


def test_cpu_head_and_autoscaling_h100_h200_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    accelerators = {
        k.split(":")[1] for t in workers.values() for k in t["resources"] if "accelerator_type" in k
    }
    assert {"H100", "H200"} <= accelerators
    for worker in workers.values():
        assert worker["resources"]["GPU"] >= 1
        assert worker["min_workers"] == 0 < worker["max_workers"]


def test_every_node_installs_the_project_at_a_pinned_commit(cluster):
    setup = _commands(cluster, "setup_commands")
    assert re.search(r"git checkout .*--detach [0-9a-f]{40}\b", setup)
    assert "pip install -q -r ~/vlm-posttrain/requirements.txt" in setup
    assert "--no-deps -e ~/vlm-posttrain" in setup
    # `ray job submit -- python` runs the python on the PATH of `ray start`: the project's venv.
    for line in _ray_start_lines(cluster):
        assert "PATH=$HOME/venv/bin:$PATH" in line


def test_hub_offline_only_on_workers(cluster):
    assert "HF_HUB_OFFLINE=1" in _commands(cluster, "worker_start_ray_commands")
    hub_side = (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",  # downloads the models with a bucket root
        "head_start_ray_commands",
        "initialization_commands",
    )
    assert "HF_HUB_OFFLINE" not in _commands(cluster, *hub_side)
    # The head fills the cache the workers read offline (shared with EFS; each worker fills its own with a bucket).
    assert "HF_HOME=/shared/hf" in _commands(cluster, "head_setup_commands")
    assert "HF_HOME=/shared/hf" in _commands(cluster, "worker_start_ray_commands")


def test_run_root_on_efs_or_a_bucket_both_shown():
    for text in ((REPO / "cluster.yaml").read_text(), (REPO / "README.md").read_text()):
        roots = re.findall(r"run\.root=(\S+)", text)
        assert roots
        assert all(r.startswith((f"{SHARED}/runs/", "s3://", "gs://")) for r in roots), roots
        assert any(r.startswith(f"{SHARED}/runs/") for r in roots), "no EFS run root shown"
        assert any(r.startswith(("s3://", "gs://")) for r in roots), "no bucket run root shown"


def _bucket_mode(text: str) -> str:
    """cluster.yaml as a bucket-root user edits it: the switch set to none, the profile lines uncommented."""
    assert text.count(SWITCH) == 1, "the storage switch must be one value in one place"
    text, uncommented = PROFILE.subn(r"\1\2", text.replace(SWITCH, "EFS_ID=none"))
    assert uncommented, "no commented IamInstanceProfile line marked 'bucket root: uncomment'"
    return text


def test_bucket_mode_gives_every_worker_an_instance_profile(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for name, node_type in cluster["available_node_types"].items():
        assert "IamInstanceProfile" not in node_type["node_config"], f"{name}: EFS as shipped needs no edit"
    bucket = yaml.safe_load(_bucket_mode((REPO / "cluster.yaml").read_text()))
    validate_config(prepare_config(bucket))
    for name, node_type in bucket["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        if name == bucket["head_node_type"]:  # Ray's default profile, ray-autoscaler-v1; workers get none
            assert profile is None
        else:
            assert re.fullmatch(r"arn:aws:iam::\w+:instance-profile/[\w+=,.@-]+", profile["Arn"]), name
    text = (REPO / "cluster.yaml").read_text()
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "iam:PassRole"):
        assert action in text  # what the nodes' role (and the head's) must allow is written down


def _run_setup(cluster_text: str, node: str, tmp_path: Path) -> str:
    """Run a head's or a worker's storage and model setup commands as Ray prepares them, sudo and hf stubbed."""
    from ray.autoscaler._private.util import prepare_config

    commands = prepare_config(yaml.safe_load(cluster_text))[f"{node}_setup_commands"]
    commands = [c for c in commands if ".vpr_storage" in c or "hf download" in c]
    home, bin_dir, log = tmp_path / node / "home", tmp_path / node / "bin", tmp_path / node / "log"
    (home / "venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    for stub, body in (
        (bin_dir / "sudo", 'echo "sudo $*" >> "$LOG"'),
        (bin_dir / "mountpoint", "exit 1"),
        (home / "venv" / "bin" / "hf", 'echo "HF_HOME=$HF_HOME offline=${HF_HUB_OFFLINE:-} hf $*" >> "$LOG"'),
    ):
        stub.write_text(f"#!/bin/bash\n{body}\n")
        stub.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)}
    env.pop("HF_HUB_OFFLINE", None)
    log.touch()
    for command in commands:  # each in its own shell, as Ray runs them
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    return log.read_text()


def test_storage_switch_mounts_efs_or_downloads_models_on_every_node(cluster, tmp_path):
    text = (REPO / "cluster.yaml").read_text()
    models = re.findall(r"hf download (\S+)", _commands(cluster, "head_setup_commands"))
    assert models
    mount = re.compile(rf"^sudo mount -t nfs4 .*fs-REPLACE_ME\.efs\.\S+:/ {SHARED}$", re.MULTILINE)
    for mode, cluster_text in (("efs", text), ("bucket", _bucket_mode(text))):
        for node in ("head", "worker"):
            log = _run_setup(cluster_text, node, tmp_path / mode)
            assert bool(mount.search(log)) == (mode == "efs"), (mode, node, log)
            assert (f"mkdir -p {SHARED}/runs" in log) == (mode == "efs"), (mode, node, log)
            assert f"mkdir -p {SHARED}/hf" in log, (mode, node, log)
            downloaded = re.findall(r"^HF_HOME=/shared/hf offline= hf download (\S+)$", log, re.MULTILINE)
            # With EFS only the head fills the shared cache; with a bucket every node fills its own.
            assert downloaded == (models if mode == "bucket" or node == "head" else []), (mode, node, log)


def test_dashboard_on_head_loopback_only(cluster):
    head = _commands(cluster, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in (REPO / "cluster.yaml").read_text()


def _ray_start_lines(cluster) -> list[str]:
    """The head's and the workers' `ray start` lines; both must exist, or the checks on them check nothing."""
    lines = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        lines[key] = [line for line in _commands(cluster, key).splitlines() if "ray start" in line]
        assert lines[key], f"no `ray start` line in {key}"
    return lines["head_start_ray_commands"] + lines["worker_start_ray_commands"]


def test_token_auth_everywhere_and_no_secret_in_the_file(cluster):
    for line in _ray_start_lines(cluster):
        assert "RAY_AUTH_MODE=token" in line
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    text = (REPO / "cluster.yaml").read_text()
    assert "RAY_AUTH_TOKEN=" not in text and not re.search(r"\bhf_[A-Za-z0-9]{20,}", text)
    keys = r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|aws_session_token"
    assert not re.search(keys, text, re.IGNORECASE)
