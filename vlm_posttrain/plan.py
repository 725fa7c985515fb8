"""The preflight plan: what a run of a config would do, and whether a later stage would fail on its input.

    python -m ray_jobs.pipeline configs/study.yaml --plan [key.path=value ...]

Trains nothing, starts no Ray, needs no GPU and writes nothing. It loads the config, the processor and the
model's config (no weights; ``tiny`` is built in memory, deterministically, as the model stage would; a
published checkpoint not on disk from ``vlm_posttrain.published``, image tokens exact, text tokens counted with
a stand-in tokenizer except LLaVA-1.5's real one) and
reads and splits the data with the data stage's own checks, then reports:

1. rows per split, and the rows the data stage would skip, counted by reason;
2. token lengths (min, p50, p90, p99, max; each image's own token count and the template's BOS included) against each
   stage's limit: SFT examples (train and val, whole conversations) vs ``sft.max_length``, with the ones
   ``data.bad_rows: skip`` would drop; DPO prompts (the pairs stage's first ``pairs.limit`` train rows) and
   prompt + the longest answer it can sample (``pairs.max_new_tokens`` + EOS) vs ``dpo.max_length``; the
   pairs and eval generation prompts + their new tokens vs the model's context;
3. the SFT grid: each trial's swept values, memory estimate (:mod:`vlm_posttrain.memory`, at
   ``sft.max_length`` as the GPU packing assumes), optimizer steps, and the packing on the card;
4. generation work per Ray Data stage (pairs, eval): prompts, samples, new tokens at most, judge calls.

A problem that would stop a later stage (an ``sft.max_length`` no example fits, a too-long example under
``data.bad_rows: fail``, a DPO prompt longer than ``dpo.max_length``, a grid that does not fit the card, an
empty val or test split) is listed in :attr:`Plan.problems`; :func:`check` raises the first as a
:class:`PlanError`, which the drivers print as one ``error:`` line with exit code 2. A problem in the data
itself (no usable rows, a bad row under ``fail``) or the model path raises at once, as its stage would.

    plan = build_plan(cfg)
    print(render(plan))
    check(plan)  # PlanError: dpo.max_length=512: 500 of 500 DPO prompts are longer ...

This module imports neither ray nor, until :func:`build_plan` runs, a model library.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from vlm_posttrain import prompts
from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.data import DataError, Rejects, split_rows
from vlm_posttrain.memory import gpu_share, trial_estimate

QUANTILES = (("p50", 50), ("p90", 90), ("p99", 99))
LENGTH_COLUMNS = ("stage", "sequence", "rows", "min", "p50", "p90", "p99", "max", "limit", "over")


class PlanError(ValueError):
    """A later stage would fail on this input: names the input, what is wrong and the fix."""


@dataclass(frozen=True)
class Plan:
    """The preflight plan of one config (see the module docstring); every table is a pandas DataFrame."""

    cfg: ExperimentConfig
    # Tokens each image becomes, over the rows' images: one number for LLaVA-1.5 (576), a range for the others.
    image_tokens: tuple[int, int, int]  # min, median, max
    context: int  # the language model's max_position_embeddings
    where: str  # the data input, as the data stage names it
    rows: pd.DataFrame  # split, rows
    rejects: pd.DataFrame  # reason, rows, examples: what the data stage would skip
    lengths: pd.DataFrame  # LENGTH_COLUMNS: one row per measured sequence
    sft_max: int  # the longest SFT example (train and val)
    sft_too_long: int  # SFT examples longer than sft.max_length (skipped under data.bad_rows: skip)
    kept_train: int  # train rows SFT trains on
    test_rows: int  # test rows the eval stage answers (under every system prompt)
    trials: pd.DataFrame  # trial, config/<swept key>..., epochs, memory_gb, steps
    swept: tuple[str, ...]
    packing: str
    # stage, runs, prompts, sequences, max_new_tokens, max_tokens, judge, judge_calls
    generation: pd.DataFrame
    variants: tuple[str, ...]  # the eval variants' names, as ray_jobs.eval.variants_of names them
    notes: tuple[str, ...]  # risks that do not stop a stage by themselves
    problems: tuple[str, ...]  # what would stop a stage; check() raises the first


# ---- inputs -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_bitsandbytes():
    # Importing peft imports bitsandbytes, which warns at import on a CPU without its optional kernel package:
    # the plan quantizes nothing, so that line would only stand beside the plan's one error line.
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_model_inputs(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """(processor, model config) without weights; ``tiny`` built as the model stage builds it."""
    with _quiet_bitsandbytes():
        from transformers import AutoConfig

        from vlm_posttrain.modeling import load_processor

        if cfg.model.name == "tiny" and cfg.model.family_name == "llava":
            from vlm_posttrain.tiny import build_processor, tiny_llava_config

            processor = build_processor()
            return processor, tiny_llava_config(processor.tokenizer)
        if cfg.model.name == "tiny":
            import tempfile

            from vlm_posttrain.tiny import BUILDERS

            with tempfile.TemporaryDirectory(prefix="plan-tiny-") as tmp:
                folder = str(BUILDERS[cfg.model.family_name](tmp))
                return load_processor(folder), AutoConfig.from_pretrained(folder)

        from vlm_posttrain import families
        from vlm_posttrain.published import PUBLISHED, stand_in_processor

        trust = cfg.model.trust_remote_code
        if cfg.model.name in PUBLISHED and families.model_type_of(cfg.model.name) is None:
            # Not on disk and no hub: the checkpoint's config and image processor as published.
            published = PUBLISHED[cfg.model.name]
            return stand_in_processor(cfg.model.name), published.config()
        processor = load_processor(cfg.model.name, trust)
        return processor, AutoConfig.from_pretrained(cfg.model.name, trust_remote_code=trust)


def _image_tokens_text(counts: tuple[int, int, int]) -> str:
    low, median, high = counts
    if low == high:
        return f"{low} image tokens"
    return f"{low}-{high} image tokens (median {median})"


def _context(model_config: Any) -> int:
    text = getattr(model_config, "text_config", model_config)
    return int(getattr(text, "max_position_embeddings", 0) or 0)


# ---- token lengths ----------------------------------------------------------------------------------------


def prompt_length(processor, conversations: list[dict], image_tokens: int, system_prompt: str = "") -> int:
    """Tokens of the generation prompt (the last answer removed), its one image's placeholder expanded to
    ``image_tokens``, BOS included."""
    text = prompts.generation_prompt(processor, conversations, system_prompt)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) + image_tokens - 1


def row_image_tokens(processor, rows: list[dict]) -> dict[str, int]:
    """Each row's image tokens by its image's size, read from the file header (nothing decoded)."""
    import io

    from PIL import Image

    from vlm_posttrain import families

    return {
        str(r["example_id"]): families.image_tokens(processor, Image.open(io.BytesIO(r["image"])))
        for r in rows
    }


def _length_row(stage: str, sequence: str, lengths: list[int], limit: int, limit_name: str) -> dict:
    values = np.asarray(lengths, dtype=np.int64)
    row: dict[str, Any] = {"stage": stage, "sequence": sequence, "rows": len(values)}
    if len(values):
        row["min"], row["max"] = int(values.min()), int(values.max())
        for name, q in QUANTILES:
            row[name] = int(np.percentile(values, q, method="higher"))
    else:
        row |= {name: pd.NA for name in ("min", "max", *(n for n, _ in QUANTILES))}
    row["limit"] = f"{limit_name}={limit}"
    row["over"] = int((values > limit).sum())
    return row


def _sft_problems(
    cfg: ExperimentConfig, lengths: dict[str, list[int]], ids: dict[str, list[str]]
) -> list[str]:
    limit, policy = cfg.sft.max_length, cfg.data.bad_rows
    problems = []
    over = [(n, i) for s in ("train", "val") for n, i in zip(lengths[s], ids[s], strict=True) if n > limit]
    if over and policy == "fail":
        n, row_id = max(over)
        problems.append(
            f"sft.max_length={limit}: {len(over)} SFT example(s) are longer (the longest, row '{row_id}', has "
            f"{n} tokens) and data.bad_rows=fail stops the SFT stage; raise sft.max_length to at least {n} or "
            "set data.bad_rows=skip"
        )
    for split in ("train", "val"):
        if lengths[split] and min(lengths[split]) > limit:
            problems.append(
                f"sft.max_length={limit}: no {split} example fits (the shortest has {min(lengths[split])} "
                f"tokens, {max(lengths[split])} the longest, image tokens included); raise sft.max_length to "
                f"at least {max(lengths[split])}"
            )
    return problems


# ---- the grid ---------------------------------------------------------------------------------------------


def optimizer_steps(rows: int, batch_size: int, grad_accum: int, epochs: float) -> int:
    """The Trainer's step count: ceil(epochs * ceil(rows / (batch_size * grad_accum)))."""
    return math.ceil(epochs * math.ceil(rows / (batch_size * grad_accum)))


def trial_table(cfg: ExperimentConfig, model_config: Any, kept_train: int) -> pd.DataFrame:
    """One row per grid point: its swept values, memory estimate at ``sft.max_length`` and optimizer steps."""
    device = "cpu" if cfg.resources.gpus_per_trial == 0 else "cuda"
    rows = []
    for n, trial in enumerate(cfg.sft.trials(), 1):
        est = trial_estimate(cfg, model_config, trial, device)
        rows.append(
            {
                "trial": n,
                **{f"config/{k}": getattr(trial, k) for k in cfg.sft.grid},
                "epochs": trial.epochs,
                "memory_gb": est["total"] / 1e9,
                "steps": optimizer_steps(kept_train, trial.batch_size, trial.grad_accum, trial.epochs),
            }
        )
    return pd.DataFrame(rows)


def _packing(cfg: ExperimentConfig, model_config: Any) -> tuple[str, str | None]:
    """(the packing line, or None and the problem when the grid does not fit the card)."""
    res = cfg.resources
    trials = len(cfg.sft.trials())
    if res.gpus_per_trial == 0:
        at_once = min(res.max_concurrent_trials, trials)
        return f"CPU only (resources.gpus_per_trial: 0): {at_once} of {trials} trial(s) at a time", None
    try:
        fraction, line = gpu_share(cfg, model_config)
    except ValueError as err:
        message = " ".join(str(err).split())
        if not message.startswith("resources."):
            message = f"resources.gpu_memory_gb={res.gpu_memory_gb:g}: {message}"
        return "", message
    extra = (
        " (if the cluster has a GPU; on none the trials run on CPU)" if res.gpus_per_trial == "auto" else ""
    )
    return line + extra, None


# ---- generation work --------------------------------------------------------------------------------------


def variant_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The eval variants the pipeline would build, named as ``ray_jobs.eval.variants_of`` names them (an SFT
    trial's id is Tune's, known only after the grid runs: ``sft/<trial n>`` here)."""
    kinds = set(cfg.eval.variants)
    names = ["base"] if "base" in kinds else []
    if "sft" in kinds:
        names += [f"sft/<trial {n}>" for n in range(1, len(cfg.sft.trials()) + 1)]
    if "soup" in kinds:
        names.append(f"soup/{cfg.soup.method}")
    if "dpo" in kinds:
        names += [f"dpo/round{i}" for i in range(1, cfg.dpo.rounds + 1)]
    return tuple(names)


def generation_table(
    cfg: ExperimentConfig, pairs_prompts: int, test_prompts: int, variants: int
) -> pd.DataFrame:
    p, e = cfg.pairs, cfg.eval
    pair_sequences = pairs_prompts * p.k
    answers = test_prompts * variants * len(e.system_prompts) * e.samples
    critic = "critic" in e.judges
    return pd.DataFrame(
        [
            {
                "stage": "pairs",
                "runs": cfg.dpo.rounds,
                "prompts": pairs_prompts,
                "sequences": pair_sequences,
                "max_new_tokens": p.max_new_tokens,
                "max_tokens": pair_sequences * p.max_new_tokens,
                "judge": p.judge,
                "judge_calls": pairs_prompts * math.comb(p.k, 2) * 2,
            },
            {
                "stage": "eval",
                "runs": 1,
                "prompts": test_prompts * len(e.system_prompts),
                "sequences": answers,
                "max_new_tokens": e.max_new_tokens,
                "max_tokens": answers * e.max_new_tokens,
                "judge": "+".join(e.judges),
                "judge_calls": answers if critic else 0,
            },
        ]
    )


# ---- the plan ---------------------------------------------------------------------------------------------


def build_plan(cfg: ExperimentConfig) -> Plan:
    """Everything the plan reports, computed without Ray, weights or writing a file.

    Raises what the data or model stage would raise on its input (``DataError``, ``ModelLoadError``); the
    problems of later stages are collected in :attr:`Plan.problems` (see :func:`check`).
    """
    # In the pipeline's order: the model (its path checked first), then the data stage's reading and split.
    processor, model_config = load_model_inputs(cfg)
    where = f"data.path '{cfg.data.path}'" if cfg.data.path else f"data.source '{cfg.data.source}'"
    by_split, _, rejects = split_rows(cfg.data, cfg.run.seed, where)
    if not by_split["train"]:
        raise DataError("the split left no training rows; lower data.val_fraction / data.test_fraction")
    with _quiet_bitsandbytes():
        from vlm_posttrain.sft import token_length
    per_row = row_image_tokens(processor, [r for rows in by_split.values() for r in rows])
    counts = sorted(per_row.values())
    notes: list[str] = []
    if not getattr(processor, "text_tokens_exact", True):
        notes.append(
            f"model '{cfg.model.name}' is not on disk: its published config and image processor are used (image "
            "tokens exact); text tokens are counted with a stand-in tokenizer, so lengths are approximate"
        )
    context = _context(model_config)
    problems: list[str] = []

    # SFT: every train and val example, whole, as the SFT stage filters them.
    sft_len = {
        s: [
            token_length(
                processor, prompts.to_messages(list(r["conversations"])), [per_row[str(r["example_id"])]]
            )
            for r in rows
        ]
        for s, rows in by_split.items()
        if s in ("train", "val")
    }
    sft_ids = {s: [str(r["example_id"]) for r in by_split[s]] for s in ("train", "val")}
    limit = cfg.sft.max_length
    kept_train = sum(n <= limit for n in sft_len["train"])
    problems += _sft_problems(cfg, sft_len, sft_ids)
    if not by_split["val"]:
        problems.append(
            f"{_split_input(cfg, 'val')}: the val split is empty, so SFT checkpoints and the soup cannot be "
            f"scored; {_split_fix(cfg, 'val')}"
        )

    # Pairs -> DPO: the first pairs.limit train rows, as the pairs stage reads them.
    pairs_rows = by_split["train"][: cfg.pairs.limit] if cfg.pairs.limit else by_split["train"]
    dpo_prompt = [
        prompt_length(processor, list(r["conversations"]), per_row[str(r["example_id"])]) for r in pairs_rows
    ]
    answer = cfg.pairs.max_new_tokens + 1
    dpo_full = [n + answer for n in dpo_prompt]
    dpo_limit = cfg.dpo.max_length
    over_prompt = sum(n > dpo_limit for n in dpo_prompt)
    if over_prompt:
        problems.append(
            f"dpo.max_length={dpo_limit}: {over_prompt} of {len(dpo_prompt)} DPO prompt(s) are longer (the longest "
            f"{max(dpo_prompt)} tokens, up to {counts[-1]} of them image tokens) and the DPO stage stops on a pair it "
            f"would cut (it never truncates or skips one); raise dpo.max_length to at least {max(dpo_full)} "
            f"(prompt + pairs.max_new_tokens + EOS)"
        )
    elif max(dpo_full) > dpo_limit:
        notes.append(
            f"dpo.max_length={dpo_limit}: {sum(n > dpo_limit for n in dpo_full)} DPO prompt(s) leave less than "
            f"pairs.max_new_tokens+1={answer} tokens for an answer; the DPO stage stops if a sampled answer is "
            f"that long: raise dpo.max_length to {max(dpo_full)} or lower pairs.max_new_tokens"
        )

    # Eval: the first eval.limit test rows, under every system prompt.
    test_rows = by_split["test"][: cfg.eval.limit] if cfg.eval.limit else by_split["test"]
    eval_prompt = [
        prompt_length(processor, list(r["conversations"]), per_row[str(r["example_id"])], sp)
        for sp in cfg.eval.system_prompts
        for r in test_rows
    ]
    if not test_rows:
        problems.append(
            f"{_split_input(cfg, 'test')}: the test split is empty and the eval stage needs test rows; "
            f"{_split_fix(cfg, 'test')}"
        )
    pairs_gen = [n + cfg.pairs.max_new_tokens for n in dpo_prompt]
    eval_gen = [n + cfg.eval.max_new_tokens for n in eval_prompt]
    for stage, lengths, new in (("pairs", pairs_gen, "pairs"), ("eval", eval_gen, "eval")):
        if context and lengths and max(lengths) > context:
            notes.append(
                f"{new}.max_new_tokens: {sum(n > context for n in lengths)} {stage} prompt(s) + "
                f"{new}.max_new_tokens exceed the model's context ({context} positions); answers may degrade "
                f"past it: lower {new}.max_new_tokens"
            )

    lengths = pd.DataFrame(
        [
            _length_row("sft", "train: conversation", sft_len["train"], limit, "sft.max_length"),
            _length_row("sft", "val: conversation", sft_len["val"], limit, "sft.max_length"),
            _length_row("dpo", "prompt", dpo_prompt, dpo_limit, "dpo.max_length"),
            _length_row("dpo", f"prompt + {answer} (answer + EOS)", dpo_full, dpo_limit, "dpo.max_length"),
            _length_row("pairs", "prompt", dpo_prompt, context, "context"),
            _length_row("pairs", f"prompt + {cfg.pairs.max_new_tokens} new", pairs_gen, context, "context"),
            _length_row("eval", "prompt", eval_prompt, context, "context"),
            _length_row("eval", f"prompt + {cfg.eval.max_new_tokens} new", eval_gen, context, "context"),
        ],
        columns=list(LENGTH_COLUMNS),
    )

    packing, problem = _packing(cfg, model_config)
    if problem:
        problems.append(problem)
    variants = variant_names(cfg)
    all_sft = sft_len["train"] + sft_len["val"]
    return Plan(
        cfg=cfg,
        image_tokens=(counts[0], counts[len(counts) // 2], counts[-1]),
        context=context,
        where=where,
        rows=pd.DataFrame({"split": list(by_split), "rows": [len(r) for r in by_split.values()]}),
        rejects=_rejects_table(rejects),
        lengths=lengths,
        sft_max=max(all_sft),
        sft_too_long=sum(n > limit for n in all_sft),
        kept_train=kept_train,
        test_rows=len(test_rows),
        trials=trial_table(cfg, model_config, kept_train),
        swept=tuple(cfg.sft.grid),
        packing=packing,
        generation=generation_table(cfg, len(pairs_rows), len(test_rows), len(variants)),
        variants=variants,
        notes=tuple(notes),
        problems=tuple(problems),
    )


def _split_input(cfg: ExperimentConfig, split: str) -> str:
    if cfg.data.source == "splits":
        return f"data.path '{cfg.data.path}' ({split}.parquet)"
    return f"data.{split}_fraction={getattr(cfg.data, f'{split}_fraction'):g}"


def _split_fix(cfg: ExperimentConfig, split: str) -> str:
    if cfg.data.source == "splits":
        return f"give {split}.parquet rows"
    return f"raise data.{split}_fraction above 0" + (" (or data.limit)" if cfg.data.limit else "")


def _rejects_table(rejects: Rejects) -> pd.DataFrame:
    rows = [
        {"reason": reason, "rows": n, "examples": ", ".join(rejects.examples.get(reason, []))}
        for reason, n in sorted(rejects.counts.items())
    ]
    return pd.DataFrame(rows, columns=["reason", "rows", "examples"])


def check(plan: Plan) -> None:
    """Raise the plan's first problem (a later stage would fail on this input) as a :class:`PlanError`."""
    if plan.problems:
        raise PlanError(plan.problems[0])


# ---- text -------------------------------------------------------------------------------------------------


def _table(df: pd.DataFrame, indent: str = "  ") -> str:
    df = df.copy()
    for column in df.columns:
        # Text columns left-aligned (pandas right-aligns everything).
        if len(df) and all(isinstance(v, str) for v in df[column]):
            width = max(len(str(column)), *(len(v) for v in df[column]))
            df[column] = [v.ljust(width) for v in df[column]]
            df = df.rename(columns={column: str(column).ljust(width)})
    text = df.to_string(index=False, na_rep="-")
    return "\n".join((indent + line).rstrip() for line in text.splitlines())


def _trial_line(row: dict, swept: tuple[str, ...]) -> str:
    values = " ".join(f"{k}={row[f'config/{k}']}" for k in swept) or "(no grid: the sft section's values)"
    return (
        f"  trial {row['trial']}: {values}  ~{row['memory_gb']:.2f} GB  {row['steps']} steps "
        f"({row['epochs']:g} epoch(s))"
    )


def render(plan: Plan) -> str:
    """The plan as the text ``--plan`` prints."""
    cfg = plan.cfg
    sft, pairs, ev = cfg.sft, cfg.pairs, cfg.eval
    trials = plan.trials
    lines = [
        f"plan: {cfg.source} (model {cfg.model.name}, {cfg.model.family_name}: "
        f"{_image_tokens_text(plan.image_tokens)} per image, "
        f"context {plan.context}); trains nothing, starts no Ray",
        "",
        f"1. data: {plan.where}, data.bad_rows={cfg.data.bad_rows}",
        _table(plan.rows),
    ]
    skipped = int(plan.rejects["rows"].sum())
    if skipped:
        lines += [f"  the data stage would skip {skipped} row(s):", _table(plan.rejects, "    ")]
    else:
        lines.append("  the data stage would skip no row")
    if plan.sft_max <= sft.max_length:
        sft_line = f"fits sft.max_length={sft.max_length}"
    else:
        what = "skipped" if cfg.data.bad_rows == "skip" else "an error under data.bad_rows=fail"
        sft_line = f"over sft.max_length={sft.max_length}: {plan.sft_too_long} example(s) too long ({what})"
    lines += [
        "",
        "2. token lengths (BOS and image tokens included)",
        _table(plan.lengths),
        f"  sft: the longest example has {plan.sft_max} tokens: {sft_line}",
        "",
        f"3. SFT grid: {len(trials)} trial(s) on {plan.kept_train} train rows, batch {sft.batch_size} x "
        f"grad_accum {sft.grad_accum} = {sft.batch_size * sft.grad_accum} rows per optimizer step "
        f"(memory at {sft.max_length} tokens per row)",
        *(_trial_line(row, plan.swept) for row in trials.to_dict("records")),
        f"  total: {int(trials['steps'].sum())} optimizer steps",
    ]
    if plan.packing:
        lines.append(f"  packing: {plan.packing}")
    gen = plan.generation.set_index("stage")
    p, e = gen.loc["pairs"], gen.loc["eval"]
    critic = f" ({e.judge_calls:,} critic calls)" if e.judge_calls else ""
    lines += [
        "",
        "4. generation (Ray Data stages)",
        f"  pairs (x{p.runs} round(s)): {p.prompts} prompts x {pairs.k} samples x {pairs.max_new_tokens} new "
        f"tokens = {p.max_tokens:,} tokens at most; {p.prompts} x C({pairs.k},2)={math.comb(pairs.k, 2)} "
        f"pair(s) x 2 orders = {p.judge_calls:,} judge calls ({pairs.judge})",
        f"  eval: {plan.test_rows} test rows x {len(plan.variants)} variants x {len(ev.system_prompts)} system "
        f"prompt(s) x {ev.samples} sample(s) = {e.sequences:,} answers x {ev.max_new_tokens} new tokens = "
        f"{e.max_tokens:,} tokens at most; judges {e.judge}{critic}",
        f"  variants: {', '.join(plan.variants)}",
    ]
    if plan.notes:
        lines += ["", "notes:", *(f"  - {n}" for n in plan.notes)]
    if plan.problems:
        lines += ["", "would fail:", *(f"  - {n}" for n in plan.problems)]
    return "\n".join(lines)
