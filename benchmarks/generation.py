"""Generation throughput: the project's batched generation (``vlm_posttrain.generation.Generator``, one
``generate`` call per batch of left-padded prompts) against a one-prompt-at-a-time loop through the same
Generator, same model, prompts, max new tokens, greedy, alternated in one process.

Generated tokens are counted up to each answer's EOS on both sides, so a batch that keeps decoding for its
slowest row is charged for it. The model is the tiny LLaVA (random weights, so answers run to about
``--max-new-tokens``); prompts are synthetic chart questions. The batch size defaults to the embedded
default's evaluation batch (``eval.batch_size`` in configs/tiny.yaml); torch runs one thread, as in a Ray
actor with ``num_cpus=1`` (``--threads``). Goal on 2 CPUs: >= 20x.

    python -m benchmarks.generation [--prompts 64] [--batch-size 16] [--max-new-tokens 24] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, median, offline_env, parser, print_table, report

GOAL = 20.0


def configured_batch_size() -> int:
    from vlm_posttrain.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    return getattr(getattr(cfg, "eval", None), "batch_size", 16)


def build_parser():
    p = parser("generation", __doc__)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: eval.batch_size of configs/tiny.yaml"
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="default: eval.max_new_tokens of tiny.yaml")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: what a Ray worker with num_cpus=1 gets, and robust on a shared machine)",
    )
    return p


def prompts_and_images(generator, n: int):
    from vlm_posttrain.config import DataConfig
    from vlm_posttrain.data import build_splits, decode_image, load_split

    folder = Path(tempfile.mkdtemp(prefix="bench-gen-")) / "data"
    build_splits(DataConfig(source="synthetic", limit=n, val_fraction=0.0, test_fraction=0.0), 0, folder)
    rows = load_split(folder, "train").head(n)
    images = [decode_image(r.image) for r in rows.itertuples()]
    texts = [generator.prompt(list(r.conversations)) for r in rows.itertuples()]
    return images, texts


def run_side(generator, images, texts, batch_size: int, sampling) -> dict:
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch_size):
        out = generator.generate(images[i : i + batch_size], texts[i : i + batch_size], sampling=sampling)
        tokens += out.generated_tokens
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    offline_env()
    import torch

    torch.set_num_threads(args.threads)
    from vlm_posttrain.config import ModelConfig
    from vlm_posttrain.generation import Generator, Sampling
    from vlm_posttrain.tiny import build_tiny_llava

    batch_size = args.batch_size or configured_batch_size()
    model_dir = build_tiny_llava(Path(tempfile.mkdtemp(prefix="bench-gen-")) / "model")
    generator = Generator.load(model_dir, ModelConfig(name=str(model_dir)))
    images, texts = prompts_and_images(generator, args.prompts)
    sampling = Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens)
    run_side(generator, images[:batch_size], texts[:batch_size], batch_size, sampling)  # warm-up
    runs = []
    for i in range(args.repeats):
        for size in (1, batch_size) if i % 2 == 0 else (batch_size, 1):
            runs.append({"repeat": i, **run_side(generator, images, texts, size, sampling)})
            print_table(runs[-1:], list(runs[-1]))
    loop = [r for r in runs if r["batch_size"] == 1]
    batched = [r for r in runs if r["batch_size"] == batch_size]
    paired = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(loop, batched, strict=True)]
    summary = {
        "loop_tokens_per_s": median(r["tokens_per_s"] for r in loop),
        "batched_tokens_per_s": median(r["tokens_per_s"] for r in batched),
        "batch_size": batch_size,
        "speedup_paired_median": median(paired),
        "paired_speedups": paired,
        "same_token_count": len({r["tokens"] for r in runs}) == 1,
        "goal": GOAL,
    }
    summary["speedup"] = summary["batched_tokens_per_s"] / summary["loop_tokens_per_s"]
    print()
    rows = [
        {"side": "one prompt at a time", "generated tok/s (median)": summary["loop_tokens_per_s"]},
        {"side": f"batched ({batch_size})", "generated tok/s (median)": summary["batched_tokens_per_s"]},
    ]
    print_table(rows, list(rows[0]))
    print(
        f"batched / loop: {summary['speedup']:.1f}x (median of paired ratios {median(paired):.1f}x; goal >= {GOAL:g}x)"
    )
    report("generation", args.out, runs, summary, config={**vars(args), "batch_size": batch_size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
