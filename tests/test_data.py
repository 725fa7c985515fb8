"""The data stage: real jsonl folders, the OneVision schema, bad rows counted or fatal, deterministic splits."""

import io
import json

import pandas as pd
import pytest
from PIL import Image

from vlm_posttrain.config import DataConfig
from vlm_posttrain.data import DataError, build_splits, collect, load_split, read_jsonl_folder, read_onevision


def _png(color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("folder, rows", [("lrv_chart_train", 1121), ("chartinsights", 729)])
def test_reads_shared_jsonl_folders(shared_data, folder, rows):
    read = list(read_jsonl_folder(shared_data / folder))
    kept, rejects = collect(read, "fail")
    assert len(kept) == rows and rejects.as_dict()["skipped"] == 0
    first = kept[0]
    assert first["conversations"][0]["value"].startswith("<image>\n")
    assert first["conversations"][1]["from"] == "gpt" and first["conversations"][1]["value"]
    assert first["answer_type"] in {"numeric", "yes_no", "short_text", "long_text"}


def test_lrv_split_keeps_each_chart_in_one_split(shared_data, tmp_path):
    cfg = DataConfig(source="jsonl", path=str(shared_data / "lrv_chart_train"), limit=200)
    metrics = build_splits(cfg, 0, tmp_path)
    assert sum(metrics["rows"].values()) == 200
    groups = {s: set(load_split(tmp_path, s)["group"]) for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    again = build_splits(cfg, 0, tmp_path / "again")
    assert again["data_hash"] == metrics["data_hash"] and again["rows"] == metrics["rows"]
    other_seed = build_splits(cfg, 1, tmp_path / "seed1")
    assert (
        other_seed["rows"] != metrics["rows"]
        or set(load_split(tmp_path / "seed1", "test")["group"]) != groups["test"]
    )


def _bad_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(_png())
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not an image at all")
    rows = [
        {"id": "good", "image": "images/ok.png", "question": "What?", "answer": "42"},
        {"id": "corrupt", "image": "images/corrupt.png", "question": "What?", "answer": "42"},
        {"id": "missing", "image": "images/gone.png", "question": "What?", "answer": "42"},
        {"id": "noq", "image": "images/ok.png", "question": "", "answer": "42"},
        {"id": "noa", "image": "images/ok.png", "question": "What?", "answer": "  "},
        {"id": "good", "image": "images/ok.png", "question": "Again?", "answer": "1"},
    ]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def test_bad_rows_are_skipped_and_counted(tmp_path):
    kept, rejects = collect(read_jsonl_folder(_bad_folder(tmp_path)), "skip")
    assert [r["example_id"] for r in kept] == ["good"]
    assert rejects.as_dict()["reasons"] == {
        "undecodable_image": 1,
        "missing_image": 1,
        "no_question": 1,
        "empty_answer": 1,
        "duplicate_id": 1,
    }


def test_bad_rows_fail_with_one_line_naming_the_row(tmp_path):
    with pytest.raises(DataError) as err:
        collect(read_jsonl_folder(_bad_folder(tmp_path)), "fail")
    assert "row 'corrupt'" in str(err.value) and "data.bad_rows=skip" in str(err.value)


def test_non_utf8_and_missing_annotations(tmp_path):
    with pytest.raises(DataError, match="no annotations.jsonl"):
        list(read_jsonl_folder(tmp_path))
    (tmp_path / "annotations.jsonl").write_bytes(b'{"id": "x", "question": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_jsonl_folder(tmp_path))


def test_empty_source_is_an_error(tmp_path):
    (tmp_path / "annotations.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable rows"):
        collect(read_jsonl_folder(tmp_path), "skip")


def test_onevision_parquet_keeps_multi_turn(tmp_path):
    conversations = [
        {"from": "human", "value": "<image>\nWhat is the highest bar?"},
        {"from": "gpt", "value": "Apples."},
        {"from": "human", "value": "And the lowest?"},
        {"from": "gpt", "value": "Kiwis."},
    ]
    df = pd.DataFrame(
        [
            {"id": "a", "image": {"bytes": _png(), "path": None}, "conversations": conversations},
            {"id": "b", "image": {"bytes": _png("blue"), "path": None}, "conversations": conversations[:2]},
        ]
    )
    df.to_parquet(tmp_path / "part-0.parquet")
    rows = list(read_onevision(str(tmp_path)))
    assert [len(r["conversations"]) for r in rows] == [4, 2]
    kept, _ = collect(rows, "fail")
    assert len(kept) == 2


def test_synthetic_source_is_deterministic(tmp_path):
    cfg = DataConfig(source="synthetic", limit=20, synthetic_image_size=32)
    a = build_splits(cfg, 5, tmp_path / "a")
    b = build_splits(cfg, 5, tmp_path / "b")
    assert a == b and sum(a["rows"].values()) == 20
    pd.testing.assert_frame_equal(load_split(tmp_path / "a", "train"), load_split(tmp_path / "b", "train"))


def test_hub_dataset_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not be loaded"):
        list(read_onevision("some-org/not-a-local-dataset", "LRV Chart"))


def test_split_folder_source_keeps_its_splits(tiny_data_dir, tmp_path):
    """A folder already split (a pairs stage's best_of_k/) is SFT data for a later round, splits unchanged."""
    cfg = DataConfig(source="splits", path=str(tiny_data_dir))
    metrics = build_splits(cfg, 123, tmp_path / "again")
    for split in ("train", "val", "test"):
        original, copied = load_split(tiny_data_dir, split), load_split(tmp_path / "again", split)
        assert list(copied["example_id"]) == list(original["example_id"])
        assert metrics["rows"][split] == len(original)
    (tmp_path / "partial").mkdir()
    load_split(tiny_data_dir, "train").to_parquet(tmp_path / "partial" / "train.parquet")
    with pytest.raises(DataError, match="needs train.parquet, val.parquet and test.parquet"):
        build_splits(DataConfig(source="splits", path=str(tmp_path / "partial")), 0, tmp_path / "x")
