"""cluster.yaml: valid for Ray's cluster launcher, and keeps the invariants a real cluster needs.

Pinned code on every node, HF_HUB_OFFLINE only on the workers (which read the model cache the head filled),
the run root on a filesystem every node mounts, the dashboard on the head's loopback, token auth everywhere,
and no secret in the file.
"""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = "/shared"


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
    head_side = (
        "setup_commands",
        "head_setup_commands",
        "head_start_ray_commands",
        "initialization_commands",
    )
    assert "HF_HUB_OFFLINE" not in _commands(cluster, *head_side)
    # The head fills the shared cache the workers read offline.
    assert "HF_HOME=/shared/hf" in _commands(cluster, "head_setup_commands")
    assert "HF_HOME=/shared/hf" in _commands(cluster, "worker_start_ray_commands")


def test_run_root_on_storage_every_node_mounts(cluster):
    setup = _commands(cluster, "setup_commands")  # runs on the head and on every worker
    assert re.search(rf"mount -t nfs4 .* {SHARED}\b", setup)
    assert f"mkdir -p {SHARED}/runs" in setup
    for text in ((REPO / "cluster.yaml").read_text(), (REPO / "README.md").read_text()):
        roots = re.findall(r"run\.root=(\S+)", text)
        assert roots and all(r.startswith(f"{SHARED}/runs/") for r in roots)


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
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key", text, re.IGNORECASE)
