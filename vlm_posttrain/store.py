"""The run store: where every artifact of an experiment lives, how it is named, and when it counts as done.

One run root per experiment: a local path, a shared filesystem mounted on every node, or a URI that
pyarrow (and so Ray) understands (``s3://bucket/run``, ``gs://...``). Each artifact is a folder
``<root>/<stage>/<stage>-<key>/`` (file names: ``vlm_posttrain.layout``) whose key is :meth:`RunStore.stage_key`:
the stage's config section without its execution settings, its inputs by id, and the seed. A stage
builds its payload in a local staging folder; ``publish`` writes ``manifest.json`` last and moves the folder
into place (rename on a local root, upload with the manifest last on a remote one), so a folder without a
manifest is never read as finished and a re-run skips every artifact that has one.

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
        if "://" in root and not root.startswith("file://"):
            self.fs, self.base = pafs.FileSystem.from_uri(root)
            self.is_local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root.removeprefix("file://")).expanduser().resolve())
            self.is_local = True
        self.root = root

    def uri(self, *parts: str) -> str:
        """A path under the root, as Ray Tune and Ray Data accept it (local path or URI)."""
        path = "/".join([self.base, *parts])
        return path if self.is_local else f"{self.root.split('://')[0]}://{path}"

    def ref(self, path: str | os.PathLike) -> str:
        """An input's id: an absolute path inside the root (or inside this machine's copy of a remote root) as
        its root-relative name, so keys survive moving the root; anything else (a hub id, a relative or outside
        folder) as it is."""
        if Path(path).is_absolute():
            for root in (Path(self.base), self._cache_root()):
                try:
                    return Path(path).resolve().relative_to(root.resolve()).as_posix()
                except ValueError:
                    continue
        return str(path)

    def stage_key(self, stage: str, section: dict, inputs: dict[str, Any], seed: int) -> str:
        """The one rule for every artifact's key: the stage, its config section without execution settings
        (``ExperimentConfig.keyed``), its inputs by id (paths by :meth:`ref`; other values, as DPO's round, as
        they are) and the seed. The inputs are the ones its manifest records."""
        ids = {k: self.ref(v) if isinstance(v, (str, os.PathLike)) else v for k, v in inputs.items()}
        return digest(stage, section, ids, seed)

    def in_artifact(self, artifact_path: str, *parts: str) -> str:
        """A path inside a published artifact, on this machine (a cached copy when the run root is remote):
        ``store.in_artifact(soup_dir, FILES["soup"]["adapter"])``."""
        stage, key = Path(artifact_path).name.split("-", 1)
        return str(Path(self.local_path(stage, key), *parts))

    def artifact_id(self, stage: str, key: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"stage '{stage}': unknown; stages are {', '.join(STAGES)}")
        return f"{stage}-{key}"

    def artifact_path(self, stage: str, key: str) -> str:
        return f"{self.base}/{stage}/{self.artifact_id(stage, key)}"

    def tune_storage(self, stage: str) -> str:
        """Where Ray Tune keeps a stage's experiment state, so ``Tuner.restore`` finds it after a crash."""
        return self.uri(stage, "_tune")

    def tune_experiment(self, stage: str, key: str) -> str:
        """One artifact's Tune experiment folder (its trials' state and checkpoints)."""
        return f"{self.tune_storage(stage)}/{self.artifact_id(stage, key)}"

    def manifest(self, stage: str, key: str) -> dict | None:
        """The artifact's manifest if it is complete, else None."""
        path = f"{self.artifact_path(stage, key)}/{MANIFEST}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode())
        return data if data.get("status") == "complete" else None

    def local_path(self, stage: str, key: str) -> Path:
        """A local folder holding the artifact (the artifact itself on a local root, a cached copy otherwise)."""
        if self.is_local:
            return Path(self.artifact_path(stage, key))
        cache = self._cache_root() / stage / self.artifact_id(stage, key)
        if not (cache / MANIFEST).exists():
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            pafs.copy_files(self.artifact_path(stage, key), str(tmp), source_filesystem=self.fs)
            tmp.rename(cache)
        return cache

    def _cache_root(self) -> Path:
        """This machine's copy of a remote root, laid out like the root itself."""
        return Path(tempfile.gettempdir()).resolve() / "vlm_posttrain_cache" / digest(self.root)

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
        final = self.artifact_path(stage, key)
        manifest = {**manifest, "status": "complete", "artifact": self.artifact_id(stage, key), "path": final}
        if self.is_local:
            if Path(final).exists():
                # A previous attempt died before its manifest: its folder is not an artifact.
                shutil.rmtree(final)
            _write_json_atomic(staging / MANIFEST, manifest)
            os.replace(staging, final)
            return final
        (staging / MANIFEST).unlink(missing_ok=True)
        pafs.copy_files(str(staging), final, destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{final}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, default=str).encode())
        shutil.rmtree(staging, ignore_errors=True)
        return final

    def write_table(self, df, *parts: str) -> str:
        """Write a DataFrame as parquet under the root (temp name, then rename)."""
        path = self.uri(*parts)
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        else:
            df.to_parquet(path, index=False)
        return path


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
