"""The run store: artifact naming, publishing with the manifest last, skipping complete artifacts."""

import io
import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from vlm_posttrain.store import RunStore, build_manifest, cache_path, digest, join, local_copy


def test_digest_is_stable_and_order_free():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_publish_makes_an_artifact_complete(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.manifest("data", "k1") is None
    staging = store.staging("data", "k1")
    (staging / "train.parquet").write_bytes(b"x")
    path = store.publish(staging, "data", "k1", build_manifest("data", {"x": 1}, {}, seed=0))
    manifest = store.manifest("data", "k1")
    assert manifest["status"] == "complete" and manifest["artifact"] == "data-k1"
    assert manifest["packages"]["torch"] and "git_commit" in manifest
    assert path.endswith("data/data-k1") and (tmp_path / "run/data/data-k1/train.parquet").exists()
    assert not staging.exists()


def test_half_written_artifact_is_not_complete(tmp_path):
    store = RunStore(tmp_path)
    folder = tmp_path / "sft" / "sft-k2"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"partial")
    assert store.manifest("sft", "k2") is None
    (folder / "manifest.json").write_text(json.dumps({"status": "running"}))
    assert store.manifest("sft", "k2") is None
    staging = store.staging("sft", "k2")
    store.publish(staging, "sft", "k2", {"stage": "sft"})
    assert store.manifest("sft", "k2")["status"] == "complete"
    assert not (folder / "adapter_model.safetensors").exists()


def test_file_uri_root_is_local(tmp_path):
    store = RunStore(f"file://{tmp_path}")
    assert store.is_local and store.uri("sft", "_tune") == f"{tmp_path}/sft/_tune"


def test_a_root_uri_with_query_options_is_refused_naming_the_fix():
    # "?endpoint_override=..." would end up in the middle of every artifact path joined onto the root.
    with pytest.raises(ValueError, match=r"run.root 's3://b/run\?endpoint_override=x': .*AWS_ENDPOINT_URL"):
        RunStore("s3://b/run?endpoint_override=x")


def _soup_key(store: RunStore, cfg, sft: str) -> str:
    return store.stage_key("soup", cfg.keyed("soup"), {"sft": f"{store.base}/sft/{sft}"}, cfg.run.seed)


def test_stage_key_leaves_out_execution_settings_and_reads_inputs_by_id(tiny_config, tmp_path):
    store = RunStore(tmp_path / "run")
    base = _soup_key(store, tiny_config(), "sft-x")
    assert _soup_key(store, tiny_config(soup={"num_cpus": 4, "num_gpus": 1}), "sft-x") == base
    assert _soup_key(store, tiny_config(soup={"select": "all"}), "sft-x") != base
    assert _soup_key(store, tiny_config(), "sft-y") != base
    assert _soup_key(store, tiny_config(run={"seed": 1}), "sft-x") != base
    # The same inputs under a moved root: the same key (inputs count by their root-relative id).
    assert _soup_key(RunStore(tmp_path / "moved"), tiny_config(), "sft-x") == base
    pairs = tiny_config(pairs={"actors": 3, "batch_size": 2, "num_cpus": 2, "warn_kept_below": 0.5})
    assert pairs.keyed("pairs") == tiny_config().keyed("pairs") != tiny_config(pairs={"k": 3}).keyed("pairs")
    assert "rounds" not in tiny_config().keyed("dpo") and "rounds" in tiny_config().section("dpo")


def test_refs_and_joins(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.ref(f"{store.base}/soup/soup-k/adapter") == "soup/soup-k/adapter"
    assert store.ref("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # a hub id stays as it is
    assert store.ref(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    assert join(store.artifact_path("dpo", "k"), "adapter") == f"{store.base}/dpo/dpo-k/adapter"
    assert join("s3://b/run/dpo/dpo-k/", "adapter") == "s3://b/run/dpo/dpo-k/adapter"  # Path would fold "//"


# ---- a bucket root, on a local S3 server and a local GCS emulator (tests/bucket_servers.py) ----------------


@pytest.fixture(scope="module", params=["s3", "gs"])
def server(request):
    from tests.bucket_servers import LocalGCS, LocalS3

    with {"s3": LocalS3, "gs": LocalGCS}[request.param]() as local:
        local.create_bucket("store-test")
        yield local


@pytest.fixture
def bucket(server, monkeypatch, tmp_path):
    """A fresh bucket prefix; the endpoint and keys in this process's environment only, this test's own cache."""
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield f"{server.uri('store-test')}/{tmp_path.name}"
    tempfile.tempdir = None


def _publish(store: RunStore, stage: str, key: str, files: dict[str, bytes]) -> str:
    staging = store.staging(stage, key)
    for name, blob in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(blob)
    return store.publish(staging, stage, key, build_manifest(stage, {}, {}, seed=0))


def test_bucket_root_publishes_manifest_last_and_lists_only_complete_artifacts(server, bucket):
    store = RunStore(f"{bucket}/run")
    assert not store.is_local and store.uri() == f"{bucket}/run"
    path = _publish(
        store, "sft", "k1", {"trials.parquet": b"t", "adapters/t0/adapter_model.safetensors": b"a"}
    )
    assert path == f"{bucket}/run/sft/sft-k1" and store.manifest("sft", "k1")["path"] == path
    assert server.listing(path) == [
        "adapters/t0/adapter_model.safetensors",
        "manifest.json",
        "trials.parquet",
    ]
    assert store.has_file(path, "trials.parquet") and not store.has_file(path, "eval.parquet")
    # An upload killed before its manifest: listed nowhere, and its files do not survive a new publish.
    with server.fs.open_output_stream(f"{server.key(bucket)}/run/soup/soup-k2/stale.bin") as f:
        f.write(b"partial")
    assert store.manifest("soup", "k2") is None
    assert [a["artifact"] for a in store.complete_artifacts()] == ["sft-k1"]
    _publish(store, "soup", "k2", {"adapter/adapter_config.json": b"{}"})
    assert server.listing(f"{bucket}/run/soup/soup-k2") == ["adapter/adapter_config.json", "manifest.json"]
    assert [a["location"] for a in store.complete_artifacts()] == [path, f"{bucket}/run/soup/soup-k2"]


def test_local_copy_fetches_a_whole_artifact_once_into_this_machines_cache(server, bucket, tmp_path):
    store = RunStore(f"{bucket}/run")
    path = _publish(
        store, "sft", "k1", {"adapters/t0/adapter_model.safetensors": b"a", "trials.parquet": b"t"}
    )
    adapter = local_copy(join(path, "adapters", "t0"))
    assert Path(adapter).is_relative_to(tmp_path / "node-tmp")  # this "node's" own temp folder
    assert (Path(adapter) / "adapter_model.safetensors").read_bytes() == b"a"
    # The whole artifact came with it (manifest included), and the next call reads no byte from the bucket.
    assert (Path(adapter).parents[1] / "manifest.json").is_file()
    server.fs.delete_dir(server.key(path))
    assert local_copy(join(path, "trials.parquet")) == str(Path(adapter).parents[1] / "trials.parquet")
    # Something never published (or only half uploaded) is an error naming it, never an empty folder.
    with pytest.raises(FileNotFoundError, match=rf"{bucket}/run/dpo/dpo-none: not a published"):
        local_copy(join(store.artifact_path("dpo", "none"), "adapter"))
    assert local_copy(str(tmp_path)) == str(tmp_path)  # a local path stays as it is


def test_keys_are_the_same_on_a_local_and_a_bucket_root(bucket, tiny_config, tmp_path):
    local, remote = RunStore(tmp_path / "run"), RunStore(f"{bucket}/run")
    assert remote.ref(f"{bucket}/run/soup/soup-k/adapter") == "soup/soup-k/adapter"
    assert remote.ref(str(cache_path(f"{bucket}/run") / "soup/soup-k/adapter")) == "soup/soup-k/adapter"
    other = f"{bucket.split('://')[0]}://other-bucket/run/soup/soup-k"
    assert remote.ref(other) == other
    cfg = tiny_config()
    keys = [
        s.stage_key("soup", cfg.keyed("soup"), {"sft": s.artifact_path("sft", "x")}, 0)
        for s in (local, remote)
    ]
    assert keys[0] == keys[1]


def test_load_run_reads_a_bucket_root(bucket):
    from analysis.run import load_run

    store = RunStore(f"{bucket}/run")
    buffer = io.BytesIO()
    pd.DataFrame({"trial_id": ["t0", "t1"], "eval_loss": [1.0, 2.0]}).to_parquet(buffer)
    _publish(store, "sft", "k1", {"trials.parquet": buffer.getvalue()})
    run = load_run(store.root)
    assert run.root == store.root and list(run.trials["trial_id"]) == ["t0", "t1"]
    assert list(run.manifests["path"]) == [f"{bucket}/run/sft/sft-k1"]
    with pytest.raises(FileNotFoundError, match=f"run root '{bucket}/nothing' not found"):
        load_run(f"{bucket}/nothing")
