"""SFT throughput: the project's collation (each batch padded to its longest example) against the study's
(every example padded to the maximum length), same model, data, seed and steps, alternated in one process.

Reports supervised (answer) tokens per second of training, the ratio, and the share of token positions
that are padding under each collation: a transformer's compute is about linear in positions, so that share
is the share of compute spent on padding. The model is the tiny LLaVA (random weights) unless ``--hidden``
widens its language model; the data is the real LRV-Chart rows in ../shared/data when present, else
synthetic charts. Only ``trainer.train()`` is timed.

    python -m benchmarks.sft [--examples 64] [--repeats 3] [--max-length 256] [--hidden 64] [--out FILE]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHARED_DATA, median, offline_env, parser, print_table, report

LRV = SHARED_DATA / "lrv_chart_train"


def build_parser():
    p = parser("sft", __doc__)
    p.add_argument("--examples", type=int, default=64, help="training examples (one epoch)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each collation, alternated")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-length", type=int, default=256, help="the padded length (configs/tiny.yaml sft.max_length)"
    )
    p.add_argument("--hidden", type=int, default=64, help="language model width (64 = the tiny model)")
    p.add_argument("--layers", type=int, default=2, help="language model layers (2 = the tiny model)")
    p.add_argument("--data", choices=["auto", "lrv", "synthetic"], default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: what a Ray worker with num_cpus=1 gets, and robust on a shared machine)",
    )
    return p


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    """The tiny LLaVA, its language model widened when asked (heads of 16 dims, MLP 2x)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vlm_posttrain.tiny import build_processor, build_tiny_llava, tiny_llava_config

    if (hidden, layers) == (64, 2):
        return build_tiny_llava(folder)
    processor = build_processor()
    config = tiny_llava_config(processor.tokenizer)
    config.text_config.update(
        dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 16,
            num_key_value_heads=hidden // 16,
        )
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_data(folder: Path, source: str, examples: int) -> str:
    from vlm_posttrain.config import DataConfig
    from vlm_posttrain.data import build_splits

    if source == "auto":
        source = "lrv" if LRV.is_dir() else "synthetic"
    if source == "lrv":
        cfg = DataConfig(source="jsonl", path=str(LRV), limit=examples, val_fraction=0.0, test_fraction=0.0)
    else:
        cfg = DataConfig(
            source="synthetic", limit=examples, val_fraction=0.0, test_fraction=0.0, synthetic_image_size=64
        )
    build_splits(cfg, 0, folder)
    return source


class Counting:
    """Wraps the trainer's collator and counts positions, real tokens and supervised tokens per batch."""

    def __init__(self, collator):
        self.collator = collator
        self.positions = self.real = self.supervised = 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.positions += batch["input_ids"].numel()
        self.real += int(batch["attention_mask"].sum())
        self.supervised += int((batch["labels"] != -100).sum())
        return batch


def train_once(model_dir: Path, dataset, processor, args, padded: bool) -> dict:
    """One epoch of the SFT trial's trainer (vlm_posttrain.sft pieces), padded to max length or not."""
    from trl import SFTTrainer

    from vlm_posttrain import modeling
    from vlm_posttrain.config import ModelConfig, SftConfig
    from vlm_posttrain.sft import trainer_args

    model_cfg = ModelConfig(name=str(model_dir))
    base = modeling.load_base(str(model_dir), model_cfg)
    sft = SftConfig(
        learning_rate=1e-3, batch_size=args.batch_size, logging_steps=10_000, lora_r=8, lora_alpha=16
    )
    model = modeling.attach_lora(base, modeling.lora_config(sft, model_cfg.lora_target), 0)
    out = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    targs = trainer_args(sft, out, 0, "float32", with_eval=False)
    targs.save_strategy = "no"
    # The study's collation: pad every batch to the maximum length (no example is longer: see to_sft_dataset).
    targs.pad_to_multiple_of = args.max_length if padded else None
    trainer = SFTTrainer(model=model, args=targs, train_dataset=dataset, processing_class=processor)
    trainer.data_collator = counter = Counting(trainer.data_collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "collation": "max_length" if padded else "longest",
        "seconds": seconds,
        "supervised_tokens": counter.supervised,
        "positions": counter.positions,
        "real_tokens": counter.real,
        "supervised_tokens_per_s": counter.supervised / seconds,
        "padding_share": 1 - counter.real / counter.positions,
    }


def summarize(runs: list[dict]) -> dict:
    by = {c: [r for r in runs if r["collation"] == c] for c in ("longest", "max_length")}
    med = {c: median(r["supervised_tokens_per_s"] for r in rs) for c, rs in by.items()}
    # Each repeat's pair ran back to back: the median of the paired ratios cancels slow drifts in load.
    paired = [
        a["supervised_tokens_per_s"] / b["supervised_tokens_per_s"] for a, b in zip(*by.values(), strict=True)
    ]
    return {
        "paired_speedups": paired,
        "speedup_paired_median": median(paired),
        "longest_tokens_per_s": med["longest"],
        "max_length_tokens_per_s": med["max_length"],
        "speedup": med["longest"] / med["max_length"],
        "padding_share_longest": by["longest"][0]["padding_share"],
        "padding_share_max_length": by["max_length"][0]["padding_share"],
        "median_seconds_longest": median(r["seconds"] for r in by["longest"]),
        "median_seconds_max_length": median(r["seconds"] for r in by["max_length"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    offline_env()
    import torch

    torch.set_num_threads(args.threads)
    from vlm_posttrain import modeling
    from vlm_posttrain.data import load_split
    from vlm_posttrain.sft import to_sft_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    model_dir = build_model(work / "model", args.hidden, args.layers)
    source = build_data(work / "data", args.data, args.examples)
    processor = modeling.load_processor(str(model_dir))
    dataset, rejects = to_sft_dataset(load_split(work / "data", "train"), processor, args.max_length, "skip")
    runs = []
    for i in range(args.repeats):
        # Alternate which collation goes first, so drift in machine load hits both alike.
        for padded in (False, True) if i % 2 == 0 else (True, False):
            runs.append({"repeat": i, **train_once(model_dir, dataset, processor, args, padded)})
            print_table(runs[-1:], list(runs[-1]))
    summary = summarize(runs)
    summary.update(data=source, examples=len(dataset), skipped_too_long=rejects.counts.get("too_long", 0))
    print()
    rows = [
        {
            "collation": c,
            "supervised tok/s (median)": summary[f"{c}_tokens_per_s"],
            "padding share": summary[f"padding_share_{c}"],
        }
        for c in ("longest", "max_length")
    ]
    print_table(rows, list(rows[0]))
    print(
        f"padding to the longest in the batch: {summary['speedup']:.2f}x the tokens/s of padding to max length "
        f"(ratio of medians; median of paired ratios {summary['speedup_paired_median']:.2f}x, {args.repeats} repeats)"
    )
    report("sft", args.out, runs, summary, config={k: v for k, v in vars(args).items() if k != "out"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
