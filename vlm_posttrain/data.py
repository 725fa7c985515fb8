"""The data stage: read chart-QA examples from any supported source, check them, split them, write parquet.

Sources (``data.source`` in the config):
- ``onevision``: the LLaVA-OneVision-Data row schema (``id``, ``image`` bytes or ``{bytes, path}``,
  ``conversations`` of ``from``/``value`` turns), from a parquet file, a folder of parquet files, or a hub
  dataset name (``data.subset`` picks the config, e.g. "LRV Chart"); multi-turn rows stay multi-turn.
- ``jsonl``: a folder with ``annotations.jsonl`` (``id``, ``image`` path, ``question``, ``answer``) and ``images/``.
- ``synthetic``: charts rendered by :mod:`vlm_posttrain.charts`, deterministic from the seed.

Every row becomes ``example_id``, ``image`` (encoded bytes), ``conversations``, ``source``, ``answer_type``.
Bad rows are skipped with a counted reason, or fail the run, by ``data.bad_rows``; nothing is cut short.
The split into train/val/test hashes each row's group (its image, so questions about one chart never
straddle splits) with the seed.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from vlm_posttrain.config import DataConfig

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
        with Image.open(io.BytesIO(row["image"])) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError):
        return "undecodable_image"
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
        }


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):
        return value.get("bytes")
    return value if isinstance(value, bytes) else None


def _onevision_row(rec: dict, source: str) -> dict:
    example_id = str(rec.get("id"))
    return {
        "example_id": example_id,
        "image": _image_bytes(rec.get("image")),
        "conversations": [{"from": t["from"], "value": t["value"]} for t in rec.get("conversations") or []],
        "source": str(rec.get("data_source") or source),
        "answer_type": "",
        "group": example_id,
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
    from vlm_posttrain.charts import synthetic_charts

    for row in synthetic_charts(
        cfg.limit, seed, image_size=cfg.synthetic_image_size, turns=cfg.synthetic_turns
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
    rows: Iterable[dict], bad_rows: str, limit: int = 0, where: str = "the data source"
) -> tuple[list[dict], Rejects]:
    """Check every row; skip-and-count or fail by policy; refuse duplicate ids. ``where`` names the input."""
    kept: list[dict] = []
    rejects = Rejects()
    seen: set[str] = set()
    for row in rows:
        reason = check_row(row)
        if reason is None and row["example_id"] in seen:
            reason = "duplicate_id"
        if reason is not None:
            if bad_rows == "fail":
                raise DataError(
                    f"{where}: row '{row['example_id']}': {reason.replace('_', ' ')}; "
                    "fix the row or set data.bad_rows=skip"
                )
            rejects.add(reason, row["example_id"])
            continue
        seen.add(row["example_id"])
        kept.append(row)
        if limit and len(kept) >= limit:
            break
    if not kept:
        skipped = (
            f" ({rejects.as_dict()['skipped']} skipped: {dict(rejects.counts)})" if rejects.counts else ""
        )
        raise DataError(f"{where}: no usable rows{skipped}; check data.source and data.path")
    return kept, rejects


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
        rows, rejects = collect(read_source(cfg, seed), cfg.bad_rows, limit, where)
        by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for row in rows:
            by_split[split_of(row["group"], seed, cfg.val_fraction, cfg.test_fraction)].append(row)
        return by_split, rows, rejects
    folder = Path(cfg.path)
    if not all((folder / f"{s}.parquet").is_file() for s in SPLITS):
        raise DataError(
            f"{where}: needs train.parquet, val.parquet and test.parquet (e.g. a pairs best_of_k/)"
        )
    by_split, rejects = {}, Rejects()
    for split in SPLITS:
        records = pd.read_parquet(folder / f"{split}.parquet").to_dict("records")
        for row in records:
            row["conversations"] = [dict(t) for t in row["conversations"]]
        if records:
            kept, split_rejects = collect(records, cfg.bad_rows, 0, f"{where} ({split})")
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
        pd.DataFrame(kept, columns=list(COLUMNS)).to_parquet(out_dir / f"{split}.parquet", index=False)
    return {
        "data_hash": data_hash(rows),
        "rows": {s: len(r) for s, r in by_split.items()},
        "rejects": rejects.as_dict(),
    }


def load_split(data_dir: str | Path, split: str) -> pd.DataFrame:
    if split not in SPLITS:
        raise ValueError(f"split '{split}': choose one of {', '.join(SPLITS)}")
    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path}: split file missing; re-run the data stage")
    return pd.read_parquet(path)


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
