"""The data stage: read chart-QA examples from any supported source, check them, split them, write parquet.

Sources (``data.source`` in the config):
- ``onevision``: the LLaVA-OneVision-Data row schema (``id``, ``image`` bytes or ``{bytes, path}``,
  ``conversations`` of ``from``/``value`` turns), from a parquet file, a folder of parquet files, or a hub
  dataset name (``data.subset`` picks the config, e.g. "LRV Chart"); multi-turn rows stay multi-turn.
- ``jsonl``: a folder with ``annotations.jsonl`` (``id``, ``image`` path, ``question``, ``answer``) and ``images/``.
- ``synthetic``: charts rendered by :mod:`vlm_posttrain.charts`, deterministic from the seed.

Every row becomes ``example_id``, ``image`` (encoded bytes), ``conversations``, ``source``, ``answer_type``.
Bad rows are skipped with a counted reason, or fail the run, by ``data.bad_rows``; nothing is cut short.
Images are checked by :func:`decode_image`, the one decoder every stage uses: over ``MAX_IMAGE_PIXELS`` or
broken is ``undecodable_image``; a short side over ``data.max_image_side`` is downscaled here, once, to PNG.
The split into train/val/test hashes each row's group (its image, so questions about one chart never
straddle splits) with the seed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vlm_posttrain.config import DataConfig
from vlm_posttrain.layout import FILES

SPLITS = ("train", "val", "test")
COLUMNS = ("example_id", "image", "conversations", "source", "answer_type", "group")


class DataError(ValueError):
    """A data problem that stops the run: names the input and what to do about it."""


@dataclass
class Rejects:
    """Counted reasons for skipped rows, with a few example ids each for the manifest."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example_id: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(example_id)

    def as_dict(self) -> dict:
        return {"skipped": sum(self.counts.values()), "reasons": dict(self.counts), "examples": self.examples}


def check_row(row: dict) -> str | None:
    """Why a row cannot be used, or None. Reasons are short stable keys used in manifests."""
    if not row.get("image"):
        return "missing_image"
    try:
        decode_image(row["image"])
    except ImageError:
        return "undecodable_image"
    return _text_problem(row)


def _text_problem(row: dict) -> str | None:
    turns = row.get("conversations") or []
    humans = [t for t in turns if t.get("from") == "human"]
    answers = [t for t in turns if t.get("from") == "gpt"]
    if not humans or not any(str(t.get("value", "")).replace("<image>", "").strip() for t in humans):
        return "no_question"
    if not answers or any(not str(t.get("value", "")).strip() for t in answers):
        return "empty_answer"
    if turns[-1].get("from") != "gpt":
        return "no_final_answer"
    return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def read_jsonl_folder(folder: Path) -> Iterator[dict]:
    """Rows of a folder holding ``annotations.jsonl`` and the images it names."""
    ann = folder / "annotations.jsonl"
    if not ann.is_file():
        raise DataError(
            f"{folder}: no annotations.jsonl; a jsonl source is a folder with annotations.jsonl + images/"
        )
    try:
        lines = ann.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{ann}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{ann}:{n}: not valid JSON ({err.msg}); fix or remove that line") from None
        image_rel = rec.get("image") or ""
        yield {
            "example_id": str(rec.get("id") or f"{folder.name}-{n}"),
            "image": _read_bytes(folder / image_rel) if image_rel else None,
            "conversations": [
                {"from": "human", "value": "<image>\n" + str(rec.get("question") or "")},
                {"from": "gpt", "value": str(rec.get("answer") or "")},
            ],
            "source": str(rec.get("source") or folder.name),
            "answer_type": str(rec.get("answer_type") or ""),
            "group": image_rel or str(rec.get("id")),
            "image_path": image_rel,  # for messages only; not written
        }


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):
        return value.get("bytes")
    return value if isinstance(value, bytes) else None


def _onevision_row(rec: dict, source: str) -> dict:
    example_id = str(rec.get("id"))
    image = rec.get("image")
    return {
        "example_id": example_id,
        "image": _image_bytes(image),
        "conversations": [{"from": t["from"], "value": t["value"]} for t in rec.get("conversations") or []],
        "source": str(rec.get("data_source") or source),
        "answer_type": "",
        "group": example_id,
        "image_path": str(image.get("path") or "") if isinstance(image, dict) else "",
    }


def read_onevision(path: str, subset: str = "") -> Iterator[dict]:
    """Rows in the LLaVA-OneVision-Data schema from parquet (file or folder) or a hub dataset name."""
    local = Path(path)
    if local.exists():
        files = sorted(local.rglob("*.parquet")) if local.is_dir() else [local]
        if not files:
            raise DataError(
                f"{path}: no parquet files; point data.path at a parquet file or a folder of them"
            )
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
                for rec in batch.to_pylist():
                    yield _onevision_row(rec, subset or file.stem)
        return
    yield from _read_hub_dataset(path, subset)


def _read_hub_dataset(name: str, subset: str) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset or None, split="train")
    except Exception as err:  # the hub raises many types; all mean "cannot get it"
        raise DataError(
            f"data.path '{name}': not a local path and the hub dataset could not be loaded "
            f"({type(err).__name__}); download it where a hub is reachable and point data.path at its parquet"
        ) from None
    for rec in ds.cast_column("image", datasets.Image(decode=False)):
        yield _onevision_row(rec, subset or name)


def read_synthetic(cfg: DataConfig, seed: int) -> Iterator[dict]:
    from vlm_posttrain.charts import READING_FAMILIES, synthetic_charts

    families = tuple(cfg.synthetic_families) or READING_FAMILIES
    for row in synthetic_charts(
        cfg.limit, seed, image_size=cfg.synthetic_image_size, turns=cfg.synthetic_turns, families=families
    ):
        yield {**row, "group": row["example_id"]}


def read_source(cfg: DataConfig, seed: int) -> Iterable[dict]:
    if cfg.source == "synthetic":
        return read_synthetic(cfg, seed)
    if cfg.source == "jsonl":
        folder = Path(cfg.path)
        if not folder.is_dir():
            raise DataError(f"data.path '{cfg.path}': folder not found; give a folder with annotations.jsonl")
        return read_jsonl_folder(folder)
    return read_onevision(cfg.path, cfg.subset)


def split_of(group: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split by a hash of (seed, group): stable when rows are added or reordered."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def collect(
    rows: Iterable[dict],
    bad_rows: str,
    limit: int = 0,
    where: str = "the data source",
    max_image_side: int = 0,
) -> tuple[list[dict], Rejects]:
    """Check every row; skip-and-count or fail by policy; refuse duplicate ids. ``where`` names the input.

    Each image is decoded once here (:func:`decode_image`'s rules). One whose short side is over
    ``max_image_side`` (0: no bound) is kept downscaled to it, re-encoded as PNG, and the kept row records
    ``downscaled_from`` (its original width, height); every other image keeps its bytes untouched.
    """
    kept: list[dict] = []
    rejects = Rejects()
    seen: set[str] = set()
    for row in rows:
        reason, image_error, image = None, None, None
        if not row.get("image"):
            reason = "missing_image"
        else:
            try:
                image, original = bound_image(row["image"], max_image_side)
            except ImageError as err:
                reason, image_error = "undecodable_image", err
        reason = reason or _text_problem(row)
        if reason is None and row["example_id"] in seen:
            reason = "duplicate_id"
        if reason is not None:
            if bad_rows == "fail":
                raise DataError(_row_error(where, row, reason, image_error))
            rejects.add(reason, row["example_id"])
            continue
        seen.add(row["example_id"])
        if image is not None:
            row = {**row, "image": image, "downscaled_from": list(original)}
        kept.append(row)
        if limit and len(kept) >= limit:
            break
    if not kept:
        skipped = (
            f" ({rejects.as_dict()['skipped']} skipped: {dict(rejects.counts)})" if rejects.counts else ""
        )
        raise DataError(f"{where}: no usable rows{skipped}; check data.source and data.path")
    return kept, rejects


def _row_error(where: str, row: dict, reason: str, image_error: ImageError | None) -> str:
    path = f" ({row['image_path']})" if row.get("image_path") else ""
    what, fix = reason.replace("_", " "), "fix the row"
    if image_error is not None:
        what, fix = f"{what} ({image_error.what})", image_error.fix
    return f"{where}: row '{row['example_id']}'{path}: {what}; {fix} or set data.bad_rows=skip"


def data_hash(rows: list[dict]) -> str:
    """Content hash of the examples (ids, image bytes, conversations), recorded in every manifest."""
    h = hashlib.sha256()
    for row in rows:
        h.update(row["example_id"].encode())
        h.update(hashlib.sha256(row["image"]).digest())
        h.update(json.dumps(row["conversations"], sort_keys=True).encode())
    return h.hexdigest()[:16]


def split_rows(cfg: DataConfig, seed: int, where: str) -> tuple[dict[str, list[dict]], list[dict], Rejects]:
    """Rows by split: read and hashed into splits, or (source ``splits``) read from a folder already split."""
    if cfg.source != "splits":
        limit = 0 if cfg.source == "synthetic" else cfg.limit
        rows, rejects = collect(read_source(cfg, seed), cfg.bad_rows, limit, where, cfg.max_image_side)
        by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for row in rows:
            by_split[split_of(row["group"], seed, cfg.val_fraction, cfg.test_fraction)].append(row)
        return by_split, rows, rejects
    folder = Path(cfg.path)
    if not all((folder / FILES["data"][s]).is_file() for s in SPLITS):
        raise DataError(
            f"{where}: needs train.parquet, val.parquet and test.parquet (e.g. a pairs best_of_k/)"
        )
    by_split, rejects = {}, Rejects()
    for split in SPLITS:
        records = pd.read_parquet(folder / FILES["data"][split]).to_dict("records")
        for row in records:
            row["conversations"] = [dict(t) for t in row["conversations"]]
        if records:
            kept, split_rejects = collect(records, cfg.bad_rows, 0, f"{where} ({split})", cfg.max_image_side)
            rejects.counts.update(split_rejects.counts)
            rejects.examples.update(split_rejects.examples)
        else:
            kept = []
        by_split[split] = kept
    return by_split, [r for s in SPLITS for r in by_split[s]], rejects


def build_splits(cfg: DataConfig, seed: int, out_dir: Path) -> dict:
    """Read, check, split and write ``train/val/test.parquet``; returns the manifest's metrics."""
    where = f"data.path '{cfg.path}'" if cfg.path else f"data.source '{cfg.source}'"
    by_split, rows, rejects = split_rows(cfg, seed, where)
    if not by_split["train"]:
        raise DataError("the split left no training rows; lower data.val_fraction / data.test_fraction")
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, kept in by_split.items():
        pd.DataFrame(kept, columns=list(COLUMNS)).to_parquet(out_dir / FILES["data"][split], index=False)
    downscaled = [r["example_id"] for r in rows if r.get("downscaled_from")]
    return {
        "data_hash": data_hash(rows),
        "rows": {s: len(r) for s, r in by_split.items()},
        "rejects": rejects.as_dict(),
        "images": {"max_side": cfg.max_image_side, "downscaled": len(downscaled), "examples": downscaled[:5]},
    }


def load_split(data_dir: str | Path, split: str) -> pd.DataFrame:
    if split not in SPLITS:
        raise ValueError(f"split '{split}': choose one of {', '.join(SPLITS)}")
    path = Path(data_dir) / FILES["data"][split]
    if not path.is_file():
        raise DataError(f"{path}: split file missing; re-run the data stage")
    return pd.read_parquet(path)


# ---- images: the one decoder every stage uses ------------------------------------------------------------

# Images over this many pixels are refused before a pixel is decoded. It is 2 x PIL's default
# Image.MAX_IMAGE_PIXELS, the size at which PIL itself raises DecompressionBombError, set here so that no
# stage depends on PIL's global (which other code may change) and everything PIL decoded before still
# decodes: a 12000 x 9000 chart (108 MP) passes, a 20000 x 20000 one (400 MP; a 50 KB PNG) does not.
# About 13,377 px square: 537 MB as RGB.
MAX_IMAGE_PIXELS = 178_956_970
# The raster formats charts come in (JPEG includes MPO); any other (EPS, which PIL renders by running
# Ghostscript, PDF, fonts, ...) is refused unopened.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "JPEG2000", "AVIF", "PPM", "TGA")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_BROKEN = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error)


class ImageError(DataError):
    """An image no stage may decode: not an accepted raster format, corrupt or truncated, or over the limit."""

    def __init__(self, what: str, fix: str = "re-export the image as PNG or JPEG"):
        super().__init__(f"image: {what}; {fix}")
        self.what, self.fix = what, fix

    def __reduce__(self):  # rebuilt from its parts when it crosses a process (a Ray task's error)
        return type(self), (self.what, self.fix)


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _too_large(size: tuple[int, int] | None) -> ImageError:
    shown = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "its pixel count"
    return ImageError(
        f"{shown}, over the {MAX_IMAGE_PIXELS:,}-pixel limit (a decompression bomb, or not a chart)",
        "downscale it (a short side of data.max_image_side px is plenty)",
    )


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The size in the header of an image PIL refused as a bomb, for the message (PIL's factories read the
    header only, and PIL's own check is in ``Image.open``)."""
    for name in _formats():
        factory, accept = Image.OPEN[name]
        try:
            accepted = not accept or accept(data[:16])
            if accepted and not isinstance(accepted, str):
                return factory(io.BytesIO(data), None).size
        except Exception:  # only for the message: any failure leaves it without the size
            continue
    return None


def _open(data: bytes | Image.Image) -> Image.Image:
    """The image with only its header read, refused unless an accepted format within MAX_IMAGE_PIXELS."""
    if isinstance(data, Image.Image):
        img = data
    else:
        try:
            with warnings.catch_warnings():  # our own limit below replaces PIL's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=_formats())
        except Image.DecompressionBombError:  # PIL's check came first (its default errors above ours)
            raise _too_large(_header_size(data)) from None
        except UnidentifiedImageError:
            raise ImageError(f"not a {'/'.join(_formats())} image") from None
        except _BROKEN as err:
            raise ImageError(f"corrupt ({type(err).__name__}: {err})") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"{width}x{height}: no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(img.size)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB by the rules of :func:`decode_image`."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT:  # PIL's own conversion clips at 255: a 16-bit image turns white
        values = np.asarray(img)
        scaled = (np.clip(values, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
        gray = Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
        key = img.info.get("transparency")
        if not isinstance(key, int):
            return gray
        return _on_white(gray, Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L"))
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img if img.mode == "RGBA" else (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        alpha = rgba.getchannel("A")
        opaque = alpha.getextrema()[0] == 255  # most RGBA charts: nothing to composite
        return rgba.convert("RGB") if opaque else _on_white(rgba.convert("RGB"), alpha)
    return img.convert("RGB")  # 1-bit, L, P, CMYK, YCbCr, LAB, HSV; F clipped to 0-255 as PIL does


def _on_white(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    out = Image.new("RGB", rgb.size, (255, 255, 255))
    out.paste(rgb, (0, 0), alpha)
    return out


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    width, height = img.size
    scale = max_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _decode(data: bytes | Image.Image, max_side: int) -> tuple[Image.Image, tuple[int, int]]:
    img = _open(data)
    size = img.size
    shrink = bool(max_side) and min(size) > max_side
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if shrink and img is not data and img.format in ("JPEG", "MPO"):  # decode at 1/2..1/8 scale
                scale = max_side / min(size)
                img.draft(img.mode, (math.ceil(size[0] * scale), math.ceil(size[1] * scale)))
            img.load()
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
    except Image.DecompressionBombError:
        raise _too_large(size) from None
    except _BROKEN as err:
        raise ImageError(f"corrupt or truncated ({type(err).__name__}: {err})") from None
    return (_shrink(rgb, max_side) if shrink else rgb), size


def decode_image(data: bytes | Image.Image, max_side: int = 0) -> Image.Image:
    """The one way any stage turns an image (encoded bytes, or a PIL image) into the model's RGB input.

    - Opened safely: only the raster formats in IMAGE_FORMATS; refused from its header, before a pixel is
      decoded, when over MAX_IMAGE_PIXELS (whatever PIL's global says); a corrupt or truncated file is an
      :class:`ImageError` (a ``DataError``), never a PIL exception.
    - The first frame of an animation; EXIF orientation applied, as a viewer shows it.
    - To 8-bit RGB: alpha (RGBA, LA, a palette or colour key with transparency) composited on white, not
      black; 16-bit grey (``I;16``, ``I``) scaled 0-65535 -> 0-255, not clipped; 1-bit, palette, CMYK,
      YCbCr by PIL's conversion.
    - ``max_side`` > 0: downscaled (Lanczos; JPEG decoded at a reduced scale first) so the short side is at
      most ``max_side``. The data stage does this once (``data.max_image_side``); later stages pass 0.
    """
    return _decode(data, max_side)[0]


def bound_image(data: bytes, max_side: int) -> tuple[bytes | None, tuple[int, int]]:
    """The data stage's image: (PNG bytes of it downscaled to ``max_side``, or None when within it; its size).

    Raises :class:`ImageError` for an image that :func:`decode_image` refuses.
    """
    img, size = _decode(data, max_side)
    if not max_side or min(size) <= max_side:
        return None, size
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue(), size
