"""The run store: artifact naming, publishing with the manifest last, skipping complete artifacts."""

import json

from vlm_posttrain.store import RunStore, build_manifest, digest


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
