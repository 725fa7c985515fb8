"""A Ray cluster on this machine for tests: a head and extra nodes on 127.0.0.1, each its own ``ray start``.

Every node runs ``ray start --block`` in the foreground under this process, so stopping one is terminating
its own pid (Ray's shutdown hook then ends the processes that node started); nothing is stopped by name and
other Ray clusters on the machine are never touched. Ports are picked free, the temp dir is private, and
token authentication uses a fresh token passed in the environment (``RAY_AUTH_MODE=token`` +
``RAY_AUTH_TOKEN``) to the nodes and to every CLI call, so ``~/.ray/auth_token`` is neither read nor written.

    with LocalRayCluster() as cluster:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=2, resources={"sft_worker": 2})
        cluster.ray("job", "submit", f"--address={cluster.dashboard_url}", "--", "python", "-c", "...")
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Ray resolves 127.0.0.1 to the machine's routable address; this keeps every node on loopback.
LOOPBACK_SITE = REPO / "tests" / "loopback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """Nodes started and stopped by this object only; use as a context manager."""

    def __init__(self, env: dict[str, str] | None = None):
        # Short: Ray's unix socket paths live under it and must stay below 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="vpr", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.nodes: list[subprocess.Popen] = []
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # SIGTERM to `ray start --block` otherwise waits up to 30s for the node to drain, which a node
            # never does while Ray Data's detached helper actors (stats, location tracker) still live on it.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # `ray job submit -- python ...` runs the python on the PATH of the node's `ray start`.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(LOOPBACK_SITE), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ports(self) -> list[str]:
        names = (
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
        return [f"--{name}={free_port()}" for name in names]

    def _start(self, args: list[str], num_cpus: float, resources: dict | None, name: str) -> None:
        # Each node its own temp dir, as on separate machines: a shared one lets a node's runtime-env agent
        # delete the job's unpacked working dir (the driver's cwd) when that node's trials end.
        temp_dir = Path(self.temp_dir) / name
        temp_dir.mkdir()
        # A temp folder of its own too (TMPDIR: Python's tempfile, the project's cache of a bucket root): what one
        # node copies or stages there, another never sees, as on separate machines.
        self.node_tmp(name).mkdir()
        cmd = [
            RAY,
            "start",
            "--block",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
            *self._ports(),
            *args,
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        log = open(Path(self.temp_dir) / f"{name}.log", "w")
        env = {**self.env, "TMPDIR": str(self.node_tmp(name))}
        self.nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))

    def node_tmp(self, name: str) -> Path:
        """A node's own temp folder (its TMPDIR): ``head``, ``node1``, ..."""
        return Path(self.temp_dir) / name / "tmp"

    def start_head(self, num_cpus: float = 1, resources: dict | None = None, timeout: float = 120) -> None:
        args = [
            "--head",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]
        self._start(args, num_cpus, resources, "head")
        self.wait_for_nodes(1, timeout)

    def add_node(self, num_cpus: float = 1, resources: dict | None = None, timeout: float = 120) -> None:
        self._start([f"--address={self.address}"], num_cpus, resources, f"node{len(self.nodes)}")
        self.wait_for_nodes(len(self.nodes), timeout)

    def api(self, path: str):
        """GET a dashboard endpoint with the cluster's token; parsed JSON."""
        request = urllib.request.Request(
            self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        data = self.api("/api/v0/nodes?detail=true&limit=100")
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"a ray node exited early:\n{self.logs()}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (OSError, ValueError, KeyError):
                pass  # dashboard not up yet
            time.sleep(1)
        raise TimeoutError(f"{count} ray node(s) not up in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(Path(self.temp_dir).glob("*.log")))

    def ray(self, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """Run the ray CLI against this cluster (same auth settings as the nodes)."""
        return subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs
        )

    def stop(self) -> None:
        """Stop the nodes this object started, newest first, each by its own pid."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(60)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
