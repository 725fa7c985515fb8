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


def test_refs_and_in_artifact(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.ref(f"{store.base}/soup/soup-k/adapter") == "soup/soup-k/adapter"
    assert store.ref("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # a hub id stays as it is
    assert store.ref(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    assert store.in_artifact(store.artifact_path("dpo", "k"), "adapter") == f"{store.base}/dpo/dpo-k/adapter"
