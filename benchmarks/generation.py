"""Generation throughput: the project's batched generation against a one-prompt-at-a-time ``generate`` loop
like the study's, same prompts, images, max new tokens and greedy decoding, alternated in one process; then
the whole Ray Data stage.

Sides, all on the tiny LLaVA (random weights, so answers run to about ``--max-new-tokens``) with three
variants (the base and two LoRA adapters, like the base and two SFT trials), on synthetic chart questions:
- ``loop``: like the study, per row: open the image, build the prompt, ``Generator.generate`` one answer, on
  the plain base model: the cost of a merged model per variant (an unmerged adapter would only make the
  loop slower, so the ratio is conservative).
- ``batched``: the answering actor's call, ``Generator.generate_encoded``, once per ``eval.batch_size`` rows
  (configs/tiny.yaml) of the same prompts, on the plain base (what a merged policy costs). The images and
  prompts are prepared once beforehand (``prepare_tasks``: decode, template, processor), as the stage's Ray
  Data tasks do on the other CPUs while the actor generates; their cost per row is reported beside. The
  goal is checked here.
- ``eval actor``: the eval actor's whole code path (``ray_jobs.eval.AnswerTests``) on the same prepared rows:
  one base with every adapter attached unmerged; a batch of one variant runs with its adapter active, a
  batch mixing variants is routed per row by PEFT. On the tiny model every op is overhead-bound, so PEFT's
  extra LoRA ops cost about a quarter of a step with one adapter and as much as the base with routing; on a
  7B base on a GPU they are a fraction of a percent of the step.
- ``ray data``: the eval stage's whole pipeline (``ray_jobs.eval.answer_dataset``: prepare tasks, actor pool,
  reference judge) on a local Ray, read as a stream: start-up (until the first answered batch reaches the driver:
  actor start, imports, model load) and steady-state throughput (after it) reported apart.

Generated tokens are counted up to each answer's EOS on every side, so a batch that keeps decoding for its
slowest row is charged for it. Torch runs one thread in-process, as in a Ray actor with ``num_cpus=1``.
Goal on 2 CPUs: batched / loop >= 20x.

    python -m benchmarks.generation [--examples 100] [--batch-size N] [--max-new-tokens 24] [--repeats 3] [--out FILE]
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
CONFIG = REPO / "configs" / "tiny.yaml"


def build_parser():
    p = parser("generation", __doc__)
    p.add_argument(
        "--examples",
        type=int,
        default=100,
        help="test examples, each asked of 3 variants (100: not a multiple of the batch, so some batches mix variants)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: eval.batch_size of configs/tiny.yaml"
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="default: eval.max_new_tokens of tiny.yaml")
    p.add_argument("--repeats", type=int, default=3, help="runs of each in-process side, alternated")
    p.add_argument("--threads", type=int, default=1, help="torch threads in-process (a num_cpus=1 actor: 1)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Data stage")
    return p


def random_adapters(model_dir: Path, folder: Path, n: int) -> list[Path]:
    """n LoRA adapters with random B (so each variant answers differently), saved in PEFT's format."""
    from vlm_posttrain.tiny import build_tiny_adapter

    return [
        build_tiny_adapter(model_dir, folder / f"adapter{i}", r=8, alpha=16, seed=i, std=0.05)
        for i in range(n)
    ]


def setup(args, folder: Path):
    from ray_jobs.eval import task_table
    from vlm_posttrain.config import DataConfig, load_config
    from vlm_posttrain.data import build_splits
    from vlm_posttrain.eval import Variant
    from vlm_posttrain.tiny import build_tiny_llava

    overrides = [f"eval.max_new_tokens={args.max_new_tokens}", "eval.temperature=0.0", "eval.samples=1"]
    if args.batch_size:
        overrides.append(f"eval.batch_size={args.batch_size}")
    cfg = load_config(CONFIG, overrides)
    model_dir = build_tiny_llava(folder / "model")
    adapters = random_adapters(model_dir, folder, 2)
    variants = [Variant("base")] + [Variant(f"sft/{p.name}", str(p)) for p in adapters]
    data = DataConfig(source="synthetic", limit=2 * args.examples, val_fraction=0.0, test_fraction=0.5)
    build_splits(data, 0, folder / "data")
    tasks = task_table(cfg.eval, str(folder / "data"), variants)
    tasks = tasks.groupby("variant", sort=False).head(args.examples).reset_index(drop=True)
    return cfg, model_dir, variants, str(folder / "data"), tasks


def run_loop(generator, tasks, sampling) -> dict:
    """Like the study: per row, open the image, build the prompt, ``generate`` one answer."""
    from vlm_posttrain.data import decode_image

    start = time.perf_counter()
    tokens = 0
    for task in tasks.itertuples(index=False):
        prompt = generator.prompt(list(task.conversations), task.system_prompt)
        tokens += generator.generate([decode_image(task.image)], [prompt], sampling=sampling).generated_tokens
    return _side("loop", 1, time.perf_counter() - start, tokens)


def run_batched(generator, prepared, batch_size: int, sampling) -> dict:
    """The answering actor's call on the loop's prompts: ``generate_encoded`` per batch of prepared rows."""
    from vlm_posttrain.eval import encoded_columns

    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prepared), batch_size):
        rows = prepared.iloc[i : i + batch_size][encoded_columns(prepared)].to_dict("records")
        tokens += generator.generate_encoded(rows, sampling=sampling).generated_tokens
    return _side("batched", batch_size, time.perf_counter() - start, tokens)


def run_actor(actor, tasks, batch_size: int) -> dict:
    start = time.perf_counter()
    tokens = sum(
        int(actor(tasks.iloc[i : i + batch_size])["answer_tokens"].sum())
        for i in range(0, len(tasks), batch_size)
    )
    return _side("eval actor", batch_size, time.perf_counter() - start, tokens)


def _side(name: str, batch_size: int, seconds: float, tokens: int) -> dict:
    return {
        "side": name,
        "batch_size": batch_size,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }


def run_ray_data(cfg, model_dir, data_dir, variants, examples: int) -> dict:
    """The eval stage's Ray Data pipeline read as a stream: start-up and steady state apart."""
    import dataclasses

    import ray

    from ray_jobs.eval import answer_dataset

    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, limit=examples))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        marks = []
        for batch in answer_dataset(cfg, str(model_dir), data_dir, variants).iter_batches(
            batch_size=None, batch_format="pandas"
        ):
            marks.append((time.perf_counter() - start, int(batch["answer_tokens"].sum()), len(batch)))
    finally:
        ray.shutdown()
    first_s, first_tokens, _ = marks[0]
    total_s, tokens = marks[-1][0], sum(m[1] for m in marks)
    steady_s = total_s - first_s
    return {
        "side": "ray data",
        "batch_size": cfg.eval.batch_size,
        "seconds": total_s,
        "tokens": tokens,
        "tokens_per_s": tokens / total_s,
        "rows": sum(m[2] for m in marks),
        "output_batches": len(marks),
        "startup_s": first_s,
        "steady_tokens_per_s": (tokens - first_tokens) / steady_s
        if len(marks) > 1 and steady_s > 0
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    offline_env()
    import torch

    torch.set_num_threads(args.threads)
    from ray_jobs.eval import AnswerTests
    from vlm_posttrain.config import ModelConfig
    from vlm_posttrain.eval import prepare_tasks
    from vlm_posttrain.generation import Generator, Sampling

    folder = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    cfg, model_dir, variants, data_dir, tasks = setup(args, folder)
    batch_size = cfg.eval.batch_size
    actor = AnswerTests(str(model_dir), ModelConfig(name=str(model_dir)), variants, cfg.eval, cfg.run.seed)
    loop_gen = Generator.load(model_dir, ModelConfig(name=str(model_dir)))
    sampling = Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    prepared = prepare_tasks(loop_gen.processor, tasks)  # in the stage: Ray Data tasks beside the actor
    prep_ms_per_row = (time.perf_counter() - start) * 1000 / len(tasks)
    sides = {
        "loop": lambda: run_loop(loop_gen, tasks, sampling),
        "batched": lambda: run_batched(loop_gen, prepared, batch_size, sampling),
        "eval actor": lambda: run_actor(actor, prepared, batch_size),
    }
    run_actor(actor, prepared.head(batch_size), batch_size)  # warm-up
    run_batched(loop_gen, prepared.head(batch_size), batch_size, sampling)
    run_loop(loop_gen, tasks.head(4), sampling)
    runs = []
    for i in range(args.repeats):
        for name in list(sides) if i % 2 == 0 else list(sides)[::-1]:
            runs.append({"repeat": i, **sides[name]()})
            print_table(runs[-1:], list(runs[-1]))
    by_side = {name: [r for r in runs if r["side"] == name] for name in sides}
    loop = by_side["loop"]
    summary = {
        "tasks": len(tasks),
        "variants": len(variants),
        "batch_size": batch_size,
        "prepare_ms_per_row": prep_ms_per_row,
        "loop_tokens_per_s": median(r["tokens_per_s"] for r in loop),
        "goal": GOAL,
    }
    for name in ("batched", "eval actor"):
        key = name.replace(" ", "_")
        paired = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(loop, by_side[name], strict=True)]
        summary[f"{key}_tokens_per_s"] = median(r["tokens_per_s"] for r in by_side[name])
        summary[f"{key}_speedup"] = summary[f"{key}_tokens_per_s"] / summary["loop_tokens_per_s"]
        summary[f"{key}_paired_speedups"] = paired
    summary["speedup"] = summary["batched_speedup"]
    summary["meets_goal"] = summary["speedup"] >= GOAL
    rows = [
        {
            "side": "one prompt at a time (loop)",
            "generated tok/s": summary["loop_tokens_per_s"],
            "x loop": 1.0,
        },
        {
            "side": f"batched generate, batch {batch_size}",
            "generated tok/s": summary["batched_tokens_per_s"],
            "x loop": summary["batched_speedup"],
        },
        {
            "side": f"eval actor (3 variants), batch {batch_size}",
            "generated tok/s": summary["eval_actor_tokens_per_s"],
            "x loop": summary["eval_actor_speedup"],
        },
    ]
    if not args.no_ray:
        stage = run_ray_data(cfg, model_dir, data_dir, variants, args.examples)
        runs.append(stage)
        summary["ray_data"] = {
            k: stage[k] for k in ("startup_s", "steady_tokens_per_s", "tokens_per_s", "rows")
        }
        summary["ray_data_steady_over_loop"] = (stage["steady_tokens_per_s"] or 0.0) / summary[
            "loop_tokens_per_s"
        ]
        steady = stage["steady_tokens_per_s"] or 0.0
        rows.append(
            {
                "side": "ray data stage, whole",
                "generated tok/s": stage["tokens_per_s"],
                "x loop": stage["tokens_per_s"] / summary["loop_tokens_per_s"],
            }
        )
        rows.append(
            {
                "side": "ray data stage, steady state",
                "generated tok/s": steady,
                "x loop": summary["ray_data_steady_over_loop"],
            }
        )
    print()
    print_table(rows, list(rows[0]))
    print(
        f"batched / loop: {summary['speedup']:.1f}x (median of paired ratios "
        f"{median(summary['batched_paired_speedups']):.1f}x; goal >= {GOAL:g}x); eval actor / loop: "
        f"{summary['eval_actor_speedup']:.1f}x"
    )
    if "ray_data" in summary:
        print(
            f"ray data stage: start-up {summary['ray_data']['startup_s']:.1f} s, steady state "
            f"{summary['ray_data_steady_over_loop']:.1f}x the loop"
        )
    report("generation", args.out, runs, summary, config={**vars(args), "batch_size": batch_size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
