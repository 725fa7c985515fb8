"""A local S3 server for tests: moto's server mode on 127.0.0.1, a free port, stopped by its own pid.

Credentials and the endpoint reach the code under test only through the environment (``env``), as on a
cluster node with an instance role or an S3-compatible store: pyarrow, Ray Tune, Ray Data and boto3 all read
``AWS_ENDPOINT_URL``. moto accepts any keys, so a test may use a planted secret as the key it checks never
leaks.

    with LocalS3(secret="...") as s3:
        s3.create_bucket("runs")
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

MOTO = str(Path(sys.executable).with_name("moto_server"))


class LocalS3:
    def __init__(self, key: str = "testing", secret: str = "testing"):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            # No instance metadata service here: never wait for one.
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)

    def __enter__(self) -> LocalS3:
        self.proc = subprocess.Popen(
            [MOTO, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"moto_server not up in 60s: {Path(self.log.name).read_text()[-2000:]}")

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

    @property
    def fs(self) -> pafs.S3FileSystem:
        """A filesystem on this server (the test's own view; the code under test resolves its own)."""
        return pafs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.endpoint,
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def create_bucket(self, name: str) -> str:
        self.fs.create_dir(name)
        return f"s3://{name}"

    def mirror(self, uri: str, dest: Path) -> Path:
        """A local copy of everything under ``uri`` (replacing ``dest``), for the Path-based assertions.

        File by file: while a run goes on, an object listed a moment ago can be gone (Tune deletes old
        checkpoints); such a file is left out, as a listing a moment later would have left it out."""
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        fs, path = self.fs, uri.removeprefix("s3://").rstrip("/")
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
        fs = self.fs
        pafs.copy_files(
            source.removeprefix("s3://"),
            dest.removeprefix("s3://"),
            source_filesystem=fs,
            destination_filesystem=fs,
        )

    def listing(self, uri: str) -> list[str]:
        """Every object key under ``uri``, relative to it."""
        path = uri.removeprefix("s3://").rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted(i.path[len(path) + 1 :] for i in infos if i.type == pafs.FileType.File)
