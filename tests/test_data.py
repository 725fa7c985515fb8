"""The data stage: real jsonl folders, the OneVision schema, bad rows counted or fatal, deterministic splits;
images decoded by one function, over-limit images refused, very large ones downscaled once."""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from vlm_posttrain.config import DataConfig
from vlm_posttrain.data import (
    MAX_IMAGE_PIXELS,
    DataError,
    ImageError,
    bound_image,
    build_splits,
    collect,
    decode_image,
    load_split,
    read_jsonl_folder,
    read_onevision,
)

REPO = Path(__file__).resolve().parents[1]


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


# ---- images: every format and mode decoded to the right RGB, bombs refused, large charts downscaled once ----


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A valid all-black 1-bit PNG of side x side: ~49 KB, 400 MP decoded; written directly, never held in PIL."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)  # filter byte + side bits, all 0
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (6, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (3, 0, 6, 4))
    return _encode(img, transparency=0)  # index 0 (black) is transparent


def _rgba() -> bytes:
    img = Image.new("RGBA", (6, 4), (0, 0, 0, 0))  # transparent black: must become white
    img.paste((0, 0, 255, 255), (3, 0, 6, 4))
    return _encode(img)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def _strip() -> bytes:
    img = Image.new("RGB", (4, 4000), "white")
    img.paste((0, 128, 0), (0, 0, 4, 1))
    return _encode(img)


# name: (file bytes, the RGB of pixel (0, 0), of pixel (-1, -1), the tolerance: JPEG is lossy)
ODD_IMAGES = {
    "cmyk.jpg": (lambda: _encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG"), (0, 255, 255), None, 3),
    "gray16.png": (
        lambda: _encode(Image.fromarray(np.array([[0, 32768], [65535, 1000]], dtype=np.uint16))),
        (0, 0, 0),
        (4, 4, 4),  # 1000 / 65535 of white, not clipped to 255 as PIL's own conversion does
        0,
    ),
    "palette_transparent.png": (_palette_with_transparency, (255, 255, 255), (255, 0, 0), 0),
    "rgba.png": (_rgba, (255, 255, 255), (0, 0, 255), 0),
    "onebit.png": (lambda: _encode(Image.new("1", (8, 8), 1)), (255, 255, 255), (255, 255, 255), 0),
    "animated.gif": (_animated_gif, (255, 0, 0), (255, 0, 0), 0),  # the first frame
    "chart.webp": (
        lambda: _encode(Image.new("RGB", (8, 8), (0, 128, 0)), "WEBP", lossless=True),
        (0, 128, 0),
        None,
        0,
    ),
    "one_pixel.png": (lambda: _encode(Image.new("RGB", (1, 1), (9, 8, 7))), (9, 8, 7), (9, 8, 7), 0),
    "strip.png": (_strip, (0, 128, 0), (255, 255, 255), 0),
}


def _close(got, want, tolerance) -> bool:
    return all(abs(g - w) <= tolerance for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_decode_image_turns_every_mode_into_the_right_rgb(name):
    make, first, last, tolerance = ODD_IMAGES[name]
    img = decode_image(make())
    assert img.mode == "RGB"
    assert _close(img.getpixel((0, 0)), first, tolerance), img.getpixel((0, 0))
    if last is not None:
        assert _close(img.getpixel((img.width - 1, img.height - 1)), last, tolerance)


def test_decode_image_refuses_bombs_and_broken_files_with_its_own_error(monkeypatch):
    bomb = bomb_png()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))  # the input the issue reports: PIL itself refuses it with a traceback
    with pytest.raises(
        ImageError, match="20000x20000 = 400,000,000 pixels, over the 178,956,970-pixel limit"
    ):
        decode_image(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our limit holds whatever PIL's global says
    with pytest.raises(
        ImageError, match="20000x20000 = 400,000,000 pixels, over the 178,956,970-pixel limit"
    ):
        decode_image(bomb)
    assert MAX_IMAGE_PIXELS == 2 * 89_478_485  # where PIL's default raises; 12000 x 9000 is under it
    png = _encode(Image.new("RGB", (64, 64), "red"))
    for broken, what in [(png[: len(png) // 2], "truncated"), (b"not an image", "not a PNG/JPEG")]:
        with pytest.raises(ImageError, match=what):
            decode_image(broken)
    with pytest.raises(ImageError, match="not a PNG/JPEG"):  # EPS would run Ghostscript: never opened
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    err = pickle.loads(pickle.dumps(ImageError("x", "y")))  # a Ray task's error crosses processes
    assert (err.what, err.fix, str(err)) == ("x", "y", "image: x; y")


def _big_chart() -> bytes:
    """A 12000 x 9000 bar chart (108 MP: over PIL's warning limit, under its error limit) as a fast PNG."""
    img = Image.new("RGB", (12000, 9000), "white")
    draw = ImageDraw.Draw(img)
    for i, color in enumerate(["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]):
        draw.rectangle([1500 + i * 1600, 8000 - (i + 2) * 900, 2500 + i * 1600, 8000], fill=color)
    for y in range(1000, 8001, 500):
        draw.rectangle([1200, y - 4, 11500, y + 4], fill="#bbbbbb")
    draw.rectangle([1200, 8000, 11500, 8030], fill="black")
    draw.rectangle([1170, 800, 1200, 8030], fill="black")
    for k in range(40):  # tick labels
        x, y = 200 + (k % 8) * 1400, 8300 + (k // 8) * 120
        draw.rectangle([x, y, x + 900, y + 60], fill="black")
    return _encode(img, compress_level=1)


def _model_view(img: Image.Image) -> np.ndarray:
    """What LLaVA-1.5's CLIP processor keeps: short side resized to 336 (bicubic), centre 336 x 336 crop."""
    w, h = img.size
    scale = 336 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - 336) // 2, (img.height - 336) // 2
    return np.asarray(img.crop((left, top, left + 336, top + 336)), dtype=np.float32)


def _image_folder(folder: Path, images: dict[str, bytes]) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = []
    for name, data in images.items():
        (folder / "images" / name).write_bytes(data)
        rows.append(
            {"id": name.split(".")[0], "image": f"images/{name}", "question": "Highest?", "answer": "A"}
        )
    (folder / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_data_stage_keeps_every_format_counts_the_bomb_and_downscales_the_big_chart_once(tmp_path):
    images = {name: make() for name, (make, *_) in ODD_IMAGES.items()}
    images |= {"bomb.png": bomb_png(), "big.png": _big_chart()}
    folder = _image_folder(tmp_path / "src", images)
    cfg = DataConfig(source="jsonl", path=str(folder), val_fraction=0.0, test_fraction=0.0, bad_rows="skip")
    metrics = build_splits(cfg, 0, tmp_path / "out")
    assert metrics["rejects"]["reasons"] == {"undecodable_image": 1}
    assert metrics["rejects"]["examples"] == {"undecodable_image": ["bomb"]}
    assert metrics["images"] == {"max_side": 1344, "downscaled": 1, "examples": ["big"]}
    stored = {r.example_id: r.image for r in load_split(tmp_path / "out", "train").itertuples()}
    assert set(stored) == {name.split(".")[0] for name in images} - {"bomb"}
    for name in ODD_IMAGES:  # within the bound: the original bytes, not re-encoded
        assert stored[name.split(".")[0]] == images[name], name
    small = Image.open(io.BytesIO(stored["big"]))
    assert (small.format, small.mode, small.size) == ("PNG", "RGB", (1792, 1344))
    diff = np.abs(_model_view(decode_image(images["big.png"])) - _model_view(decode_image(stored["big"])))
    assert diff.mean() < 0.5 and diff.max() < 16, (diff.mean(), diff.max())  # measured 0.16 and 5 of 255


def test_max_image_side_bounds_the_short_side_zero_keeps_all_and_small_bounds_are_refused():
    big = _encode(Image.new("RGB", (2000, 1500), "white"))
    assert bound_image(big, 0) == (None, (2000, 1500))
    downscaled, size = bound_image(big, 1000)
    assert size == (2000, 1500) and Image.open(io.BytesIO(downscaled)).size == (1333, 1000)
    photo = _encode(Image.new("RGB", (4000, 3000), "white"), "JPEG")  # decoded at 1/2 scale, then resized
    assert Image.open(io.BytesIO(bound_image(photo, 1344)[0])).size == (1792, 1344)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to view
    assert decode_image(_encode(Image.new("RGB", (8, 4)), "JPEG", exif=exif)).size == (4, 8)
    assert DataConfig(source="synthetic", limit=1).max_image_side == 1344
    DataConfig(source="synthetic", limit=1, max_image_side=0).validate()
    with pytest.raises(ValueError, match="max_image_side: must be 0 .* or >= 336"):
        DataConfig(source="synthetic", limit=1, max_image_side=100).validate()


def test_a_bomb_under_fail_ends_the_data_driver_with_one_line(tmp_path):
    folder = _image_folder(tmp_path / "src", {"ok.png": _png(), "bomb.png": bomb_png()})
    overrides = [f"run.root={tmp_path / 'run'}", "data.source=jsonl", f"data.path={folder}"]
    overrides += ["data.val_fraction=0", "data.test_fraction=0", "data.bad_rows=fail"]
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.data", str(REPO / "configs" / "tiny.yaml"), *overrides],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: data.path '{folder}': row 'bomb' (images/bomb.png): undecodable image (")
    assert "20000x20000" in line and "178,956,970-pixel limit" in line and "data.bad_rows=skip" in line
    assert not list((tmp_path / "run").glob("data/data-*"))
