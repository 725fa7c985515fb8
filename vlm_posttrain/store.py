"""The run store: where every artifact of an experiment lives, how it is named, and when it counts as done.

One run root per experiment: a local path, a shared filesystem mounted on every node, or a URI that
pyarrow (and so Ray) understands (``s3://bucket/run``, ``gs://...``). Each artifact is a folder
``<root>/<stage>/<stage>-<key>/`` (file names: ``vlm_posttrain.layout``) whose key is :meth:`RunStore.stage_key`:
the stage's config section without its execution settings, its inputs by id, and the seed. A stage
builds its payload in a local staging folder; ``publish`` writes ``manifest.json`` last and moves the folder
into place (rename on a local root, upload with the manifest last on a remote one), so a folder without a
manifest is never read as finished and a re-run skips every artifact that has one.

On an object-store root nothing is head-local: stages hand each other artifact URIs, and whatever process
needs the files (a driver, a Tune trial, a Ray Data actor, on any node) calls :func:`local_copy`, which copies
a published artifact once into that machine's cache. The filesystem is resolved from the URI in every process
(pyarrow's ``FileSystem.from_uri``, as Ray Tune and Ray Data do); credentials and an endpoint override
(``AWS_ENDPOINT_URL`` for an S3-compatible server) come from each node's environment or instance role, never
from the config.

Every path of a run is built here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from vlm_posttrain.layout import MANIFEST, PROVENANCE, STAGES

PACKAGES = ("torch", "transformers", "peft", "trl", "ray", "accelerate", "bitsandbytes", "pyarrow", "pandas")


def is_uri(path: str | os.PathLike) -> bool:
    """An object-store location (``s3://``, ``gs://``) rather than a path on this machine."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(location: str | os.PathLike, *parts: str) -> str:
    """A path inside an artifact or folder, for a local path and a URI alike (``Path`` would fold ``s3://``)."""
    return "/".join([str(location).rstrip("/"), *parts])


def cache_path(uri: str) -> Path:
    """Where this machine keeps its copy of an object-store location: laid out like the bucket, so the copy of
    ``s3://b/run/sft/sft-k`` is ``<tmp>/vlm_posttrain_cache/s3/b/run/sft/sft-k``."""
    scheme, path = uri.split("://", 1)
    return Path(tempfile.gettempdir()).resolve() / "vlm_posttrain_cache" / scheme / path.strip("/")


def local_copy(location: str | os.PathLike) -> str:
    """A local path for an artifact location: a local path as it is; a URI copied once into this machine's cache.

    Inside a published artifact (``<root>/<stage>/<stage>-<key>/...``) the whole artifact is copied, manifest
    and all, and only a published one (its manifest is there). The copy is made under a temporary name and
    renamed when whole: a killed copy is never taken for a finished one, and of two processes copying at once
    the first rename wins. Published artifacts never change (their key is their content), so a cached copy
    stays valid. The cache is under ``$TMPDIR``: point it at a disk with room for the artifacts a node loads.
    """
    location = str(location)
    if not is_uri(location):
        return location
    scheme, path = location.split("://", 1)
    parts = path.strip("/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        stage, name = parts[i - 1], parts[i]
        if stage in STAGES and name.startswith(f"{stage}-"):
            artifact = f"{scheme}://{'/'.join(parts[: i + 1])}"
            return join(_fetch(artifact, MANIFEST), *parts[i + 1 :])
    return _fetch(location, None)


def _fetch(uri: str, marker: str | None) -> str:
    target = cache_path(uri)
    done = target / marker if marker else target
    if done.exists():
        return str(target)
    fs, path = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(path)
    missing = pafs.FileType.NotFound
    if info.type == missing or (marker and fs.get_file_info(f"{path}/{marker}").type == missing):
        what = "a published artifact (it has no manifest: unfinished or removed)" if marker else "found"
        raise FileNotFoundError(f"{uri}: not {what}; run the stage that writes it again")
    # Copied under a temporary name and renamed: a copy killed half-way is never taken for a whole one.
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if info.type == pafs.FileType.Directory:
        tmp.mkdir()  # copy_files makes the folders below its destination, not the destination itself
    pafs.copy_files(path, str(tmp), source_filesystem=fs)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process on this machine finished the same copy first.
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return str(target)


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config sections, input ids, data hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunStore:
    """Paths, completion checks and publishing for one run root."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if is_uri(root):
            if "?" in root or "#" in root:
                raise ValueError(
                    f"run.root '{root}': a URI with query options cannot be joined into artifact paths; give "
                    "the endpoint in the environment instead (AWS_ENDPOINT_URL, CLOUD_STORAGE_EMULATOR_ENDPOINT)"
                )
            self.fs, self.base = pafs.FileSystem.from_uri(root)
            self.base = self.base.rstrip("/")
            # Spelled as given ("gs://anonymous@bucket/run" keeps its user): every process resolves it alike.
            self._root_uri = root.rstrip("/")
            self.is_local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root.removeprefix("file://")).expanduser().resolve())
            self.is_local = True
        self.root = root

    def uri(self, *parts: str) -> str:
        """A location under the root as every process names it (Ray Tune, Ray Data, pandas, :func:`local_copy`):
        a local path, or the root's URI followed by ``/``-joined parts."""
        return "/".join([self.base if self.is_local else self._root_uri, *parts])

    def ref(self, path: str | os.PathLike) -> str:
        """An input's id: a location inside the root (a path, a URI, or this machine's copy of a remote root)
        as its root-relative name, so keys survive moving the root; anything else (a hub id, a relative or outside
        folder) as it is."""
        path = str(path)
        if is_uri(path):
            prefix = self.uri() + "/"
            return path.removeprefix(prefix) if path.startswith(prefix) and not self.is_local else path
        if Path(path).is_absolute():
            roots = [Path(self.base)] if self.is_local else [cache_path(self.uri())]
            for root in roots:
                try:
                    return Path(path).resolve().relative_to(root.resolve()).as_posix()
                except ValueError:
                    continue
        return path

    def stage_key(self, stage: str, section: dict, inputs: dict[str, Any], seed: int) -> str:
        """The one rule for every artifact's key: the stage, its config section without execution settings
        (``ExperimentConfig.keyed``), its inputs by id (paths by :meth:`ref`; other values, as DPO's round, as
        they are) and the seed. The inputs are the ones its manifest records."""
        ids = {k: self.ref(v) if isinstance(v, (str, os.PathLike)) else v for k, v in inputs.items()}
        return digest(stage, section, ids, seed)

    def artifact_id(self, stage: str, key: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"stage '{stage}': unknown; stages are {', '.join(STAGES)}")
        return f"{stage}-{key}"

    def artifact_path(self, stage: str, key: str) -> str:
        """The artifact's location as stages hand it on: a local path, or a URI on an object-store root."""
        return self.uri(stage, self.artifact_id(stage, key))

    def _fs_path(self, stage: str, key: str) -> str:
        return f"{self.base}/{stage}/{self.artifact_id(stage, key)}"

    def tune_storage(self, stage: str) -> str:
        """Where Ray Tune keeps a stage's experiment state, so ``Tuner.restore`` finds it after a crash."""
        return self.uri(stage, "_tune")

    def tune_experiment(self, stage: str, key: str) -> str:
        """One artifact's Tune experiment folder (its trials' state and checkpoints)."""
        return f"{self.tune_storage(stage)}/{self.artifact_id(stage, key)}"

    def manifest(self, stage: str, key: str) -> dict | None:
        """The artifact's manifest if it is complete, else None."""
        return self._read_manifest(f"{self._fs_path(stage, key)}/{MANIFEST}")

    def _read_manifest(self, path: str) -> dict | None:
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode())
        return data if data.get("status") == "complete" else None

    def complete_artifacts(self) -> list[dict]:
        """Every complete artifact's manifest under the root, ``location`` added (as :meth:`artifact_path`
        gives it); a folder without a manifest (a build or an upload in progress, or killed) is not listed."""
        found = []
        for stage in STAGES:
            # Every object's path, then the manifests one level down: pyarrow's GCS lists no folder that is only
            # a prefix of objects when the listing is not recursive (apache/arrow#35993).
            stage_dir = f"{self.base}/{stage}"
            for info in self.fs.get_file_info(
                pafs.FileSelector(stage_dir, recursive=True, allow_not_found=True)
            ):
                folder, file = info.path.rsplit("/", 1)
                parent, name = folder.rsplit("/", 1)
                # Not staging folders (``.<id>.tmp-*``) nor Tune's ``_tune``.
                if file == MANIFEST and parent == stage_dir and name.startswith(f"{stage}-"):
                    data = self._read_manifest(info.path)
                    if data is not None:
                        found.append({**data, "location": self.uri(stage, name)})
        return sorted(found, key=lambda a: a["location"])

    def has_file(self, artifact_path: str, name: str) -> bool:
        """Whether a published artifact holds a file (checked where it lies)."""
        return self.fs.get_file_info(self._fs_location(join(artifact_path, name))).type == pafs.FileType.File

    def _fs_location(self, location: str) -> str:
        """A location under the root as a path on ``self.fs``."""
        if self.is_local:
            return location
        if not location.startswith(self._root_uri + "/"):
            raise ValueError(f"{location}: not under the run root {self._root_uri}")
        return self.base + location.removeprefix(self._root_uri)

    def read_table(self, artifact_path: str, name: str):
        """A parquet table of an artifact, read where it lies (no copy of the rest of the artifact)."""
        import pandas as pd

        return pd.read_parquet(join(artifact_path, name))

    def read_manifest(self, artifact_path: str) -> dict:
        """A published artifact's manifest, read where it lies."""
        stage, key = artifact_path.rstrip("/").rsplit("/", 1)[-1].split("-", 1)
        data = self.manifest(stage, key)
        if data is None:
            raise FileNotFoundError(f"{artifact_path}: no complete artifact there; run its stage again")
        return data

    def staging(self, stage: str, key: str) -> Path:
        """A fresh local folder to build an artifact in; on a local root it sits beside its final place."""
        if self.is_local:
            final = Path(self.artifact_path(stage, key))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}")
            tmp.mkdir()
            return tmp
        return Path(tempfile.mkdtemp(prefix=f"{stage}-{key}-{os.getpid()}-"))

    def discard_staging(self, stage: str, key: str) -> None:
        """Remove this process's staging folders of one artifact (a failed build leaves nothing behind)."""
        if self.is_local:
            final = Path(self.artifact_path(stage, key))
            parent, pattern = final.parent, f".{final.name}.tmp-{os.getpid()}-*"
        else:
            parent, pattern = Path(tempfile.gettempdir()), f"{stage}-{key}-{os.getpid()}-*"
        for folder in parent.glob(pattern):
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staging: Path, stage: str, key: str, manifest: dict) -> str:
        """Write the manifest last and move the staged folder into place; returns the artifact path."""
        final = self._fs_path(stage, key)
        location = self.artifact_path(stage, key)
        manifest = {
            **manifest,
            "status": "complete",
            "artifact": self.artifact_id(stage, key),
            "path": location,
        }
        if self.is_local:
            if Path(final).exists():
                # A previous attempt died before its manifest: its folder is not an artifact.
                shutil.rmtree(final)
            _write_json_atomic(staging / MANIFEST, manifest)
            os.replace(staging, final)
            return location
        (staging / MANIFEST).unlink(missing_ok=True)
        if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            # An upload killed before its manifest: not an artifact, and none of its files may survive into this one.
            # Its contents, not the folder: on GCS a folder that is only a prefix has no object to delete.
            self.fs.delete_dir_contents(final, missing_dir_ok=True)
        pafs.copy_files(str(staging), final, destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{final}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, default=str).encode())
        shutil.rmtree(staging, ignore_errors=True)
        return location


def build_manifest(
    stage: str,
    section: dict,
    inputs: dict[str, str],
    seed: int,
    metrics: dict | None = None,
    timings: dict | None = None,
    **extra: Any,
) -> dict:
    """The record every artifact carries: what made it, from what, with which code, and how it went."""
    return {
        "stage": stage,
        "config": section,
        "inputs": inputs,
        "seed": seed,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": metrics or {},
        "timings": timings or {},
        **extra,
    }


def write_provenance(
    adapter_dir: Path, stage: str, config: dict, inputs: dict[str, Any], seed: int, **extra
) -> None:
    """``provenance.json`` in an adapter folder: what made it (stage, the config it was trained or combined
    with, its inputs, seed, code), so the folder describes itself when copied out of the run. What the folder's
    writer recorded there already (a soup's method and weights) is kept unless given again."""
    path = Path(adapter_dir) / PROVENANCE
    record = {
        **(json.loads(path.read_text()) if path.is_file() else {}),
        "stage": stage,
        "config": config,
        "inputs": inputs,
        "seed": seed,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    path.write_text(json.dumps(record, indent=2, default=str))


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
