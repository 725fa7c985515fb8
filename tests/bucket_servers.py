"""Local object stores for tests, on 127.0.0.1 at a free port, each stopped by its own pid: S3 (moto's server
mode) and Google Cloud Storage (gcp-storage-emulator).

Credentials and the endpoint reach the code under test only through the environment (``env``), as on a
cluster node with an instance role or an S3-compatible store: pyarrow, Ray Tune, Ray Data and boto3 all read
``AWS_ENDPOINT_URL``; pyarrow's GCS client reads ``CLOUD_STORAGE_EMULATOR_ENDPOINT``. moto accepts any keys, so
a test may use a planted secret as the key it checks never leaks. The GCS emulator takes no credentials: its
URIs name the anonymous user (``gs://anonymous@bucket/...``), else pyarrow would ask Google's metadata server.

    with LocalS3(secret="...") as s3:
        root = s3.create_bucket("runs")          # "s3://runs"
        subprocess.run([...], env={**os.environ, **s3.env})
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

from tests.ray_cluster import free_port

BIN = Path(sys.executable).parent


class _LocalServer:
    """A server process started from ``command``, ready when ``ready_url`` answers; the bucket helpers.

    ``fs`` is the test's own view of the server; the code under test resolves its own from the URI."""

    def __init__(self, name: str, scheme: str):
        self.name, self.scheme = name, scheme
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.command: list[str] = []
        self.ready_url = self.endpoint
        self.env: dict[str, str] = {}
        self.fs: pafs.FileSystem | None = None
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)

    def __enter__(self):
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.ready_url, timeout=2).close()
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{self.name} not up in 60s: {Path(self.log.name).read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.log.name).unlink(missing_ok=True)

    def uri(self, bucket: str) -> str:
        return f"{self.scheme}://{bucket}"

    def key(self, uri: str) -> str:
        """A URI on this server as a path on :attr:`fs` (``gs://anonymous@b/run/`` -> ``b/run``)."""
        path = uri.split("://", 1)[1].rstrip("/")
        return path.split("@", 1)[1] if "@" in path.split("/", 1)[0] else path

    def create_bucket(self, name: str) -> str:
        self.fs.create_dir(name)
        return self.uri(name)

    def mirror(self, uri: str, dest: Path) -> Path:
        """A local copy of everything under ``uri`` (replacing ``dest``), for the Path-based assertions.

        File by file: while a run goes on, an object listed a moment ago can be gone (Tune deletes old
        checkpoints); such a file is left out, as a listing a moment later would have left it out."""
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        fs, path = self.fs, self.key(uri)
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
            if info.type != pafs.FileType.File:
                continue
            target = dest / info.path[len(path) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with fs.open_input_stream(info.path) as f:
                    target.write_bytes(f.read())
            except OSError:  # pyarrow raises S3's RESOURCE_NOT_FOUND as a plain OSError
                if fs.get_file_info(info.path).type != pafs.FileType.NotFound:
                    raise
                target.unlink(missing_ok=True)
        return dest

    def copy(self, source: str, dest: str) -> None:
        """Copy a folder inside the server (``s3://b/run1/model/model-x`` -> ``s3://b/run2/model/model-x``)."""
        pafs.copy_files(
            self.key(source), self.key(dest), source_filesystem=self.fs, destination_filesystem=self.fs
        )

    def listing(self, uri: str) -> list[str]:
        """Every object key under ``uri``, relative to it."""
        path = self.key(uri)
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted(i.path[len(path) + 1 :] for i in infos if i.type == pafs.FileType.File)


class LocalS3(_LocalServer):
    """moto's S3 server; ``env`` holds the keys and ``AWS_ENDPOINT_URL``."""

    def __init__(self, key: str = "testing", secret: str = "testing"):
        super().__init__("moto_server", "s3")
        self.command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        self.ready_url = f"{self.endpoint}/moto-api/"
        self.env = {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            # No instance metadata service here: never wait for one.
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.fs = pafs.S3FileSystem(
            access_key=key,
            secret_key=secret,
            endpoint_override=self.endpoint,
            region="us-east-1",
            allow_bucket_creation=True,
        )


class LocalGCS(_LocalServer):
    """gcp-storage-emulator, in memory; ``env`` holds ``CLOUD_STORAGE_EMULATOR_ENDPOINT``, URIs the anonymous user."""

    def __init__(self):
        super().__init__("gcp-storage-emulator", "gs")
        self.command = [
            str(BIN / "gcp-storage-emulator"), "start", "--host=127.0.0.1", f"--port={self.port}", "--in-memory",
        ]  # fmt: skip
        self.ready_url = f"{self.endpoint}/storage/v1/b"
        self.env = {"CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint}
        self.fs = pafs.GcsFileSystem(
            anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{self.port}", project_id="test"
        )

    def uri(self, bucket: str) -> str:
        return f"gs://anonymous@{bucket}"
