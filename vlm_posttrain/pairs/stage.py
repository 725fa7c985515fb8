"""The pairs stage's work without Ray: sample K answers per train prompt, judge them, write the outputs.

Each step is a plain function on a pandas batch of data-stage rows, so the Ray Data actors in
``ray_jobs/pairs.py`` wrap them one to one and tests call them directly:

1. :func:`generate_samples` adds ``samples``, ``sample_tokens``, ``sample_seeds``, ``gen_s``;
2. :func:`judge_samples` adds ``comparisons`` (JSON: every pair, both showings), ``scores`` (wins minus
   losses), ``best``, ``worst`` (-1 where best and worst tie: the prompt is dropped) and ``judge_s``;
3. :func:`write_outputs` writes, into an artifact folder:
   - ``pairs.parquet``: TRL's conversational vision preference rows (``images``, ``prompt``, ``chosen``,
     ``rejected``) plus ``example_id``, ``judge``, ``verdicts``, ``chosen_score``, ``rejected_score``,
     ``chosen_len``, ``rejected_len``; written with HF datasets' features, so ``datasets`` reads the images
     as PIL and the rows go straight into TRL's ``DataCollatorForVisionPreference``;
   - ``best_of_k/``: a data-stage folder (``train.parquet`` = the best sample per prompt as the answer, the
     data stage's ``val``/``test`` copied) that the SFT stage takes as its data folder in a later round;
   - ``samples.parquet``: every sample with its seed, length and score; ``diagnostics.parquet``.

    judged = run_local(generator, judge, load_split(data_dir, "train"), cfg.pairs, seed=0)
    metrics = write_outputs(judged, "self", data_dir, out_dir)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import scipy.stats

from vlm_posttrain import prompts
from vlm_posttrain.config import PairsConfig
from vlm_posttrain.data import COLUMNS, decode_image
from vlm_posttrain.generation import Sampling, derive_seed
from vlm_posttrain.layout import FILES
from vlm_posttrain.pairs.judges import (
    FIRST,
    SECOND,
    TIE,
    UNPARSED,
    PairTask,
    PairVerdict,
    all_pairs,
    best_and_worst,
    tournament,
)

PAIRS, BEST_OF_K, SAMPLES, DIAGNOSTICS = (
    FILES["pairs"][name] for name in ("pairs", "best_of_k", "samples", "diagnostics")
)
# The columns of pairs.parquet (TRL's vision preference rows, plus which samples were picked).
PREFERENCE_FEATURES = (
    "images",
    "prompt",
    "chosen",
    "rejected",
    "example_id",
    "judge",
    "verdicts",
    "chosen_score",
    "rejected_score",
    "chosen_len",
    "rejected_len",
    "chosen_sample",
    "rejected_sample",
)


def _column(batch: pd.DataFrame, values: Sequence) -> pd.Series:
    # Lists stay one object per row (pandas would otherwise try to spread equal-length lists into columns).
    return pd.Series(list(values), index=batch.index, dtype=object)


def generate_samples(generator, batch: pd.DataFrame, cfg: PairsConfig, seed: int) -> pd.DataFrame:
    """K sampled answers per row, each seeded from (run seed, example id, sample index)."""
    images = [decode_image(b) for b in batch["image"]]
    texts = [generator.prompt(list(c)) for c in batch["conversations"]]
    seeds = [derive_seed(seed, "pairs", str(e)) for e in batch["example_id"]]
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    out = generator.generate(images, texts, k=cfg.k, sampling=sampling, seeds=seeds)
    batch = batch.copy()
    batch["samples"] = _column(batch, out.texts)
    batch["sample_tokens"] = _column(batch, out.tokens)
    batch["sample_seeds"] = _column(batch, out.seeds)
    batch["gen_s"] = out.seconds / max(len(batch), 1)
    return batch


def pair_tasks(row, image) -> list[tuple[tuple[int, int], PairTask]]:
    conversations = list(row.conversations)
    question, reference = prompts.final_question(conversations), prompts.final_answer(conversations)
    samples = list(row.samples)
    return [
        (
            (i, j),
            PairTask(
                image,
                question,
                samples[i],
                samples[j],
                reference,
                str(row.answer_type or ""),
                f"{row.example_id}:{i}:{j}",
            ),
        )
        for i, j in all_pairs(len(samples))
    ]


def judge_samples(judge, batch: pd.DataFrame) -> pd.DataFrame:
    """Every pair of each row's samples judged in both orders; the tournament picks best and worst."""
    per_row = [pair_tasks(row, decode_image(row.image)) for row in batch.itertuples(index=False)]
    start = time.perf_counter()
    verdicts = iter(judge.judge_pairs([task for tasks in per_row for _, task in tasks]))
    seconds = time.perf_counter() - start
    comparisons, scores, best, worst = [], [], [], []
    for tasks, k in zip(per_row, (len(s) for s in batch["samples"]), strict=True):
        judged = {ij: next(verdicts) for ij, _ in tasks}
        row_scores = tournament(k, {ij: v.winner for ij, v in judged.items()})
        picked = best_and_worst(row_scores) or (-1, -1)
        comparisons.append(json.dumps([{"i": i, "j": j, **v.to_dict()} for (i, j), v in judged.items()]))
        scores.append(row_scores)
        best.append(picked[0])
        worst.append(picked[1])
    batch = batch.copy()
    batch["comparisons"] = comparisons
    batch["scores"] = _column(batch, scores)
    batch["best"] = best
    batch["worst"] = worst
    batch["judge_s"] = seconds / max(len(batch), 1)
    return batch


def run_local(generator, judge, train: pd.DataFrame, cfg: PairsConfig, seed: int) -> pd.DataFrame:
    """The whole stage in this process, batch by batch (tests, and machines without Ray)."""
    rows = train.head(cfg.limit) if cfg.limit else train
    judged = []
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows.iloc[start : start + cfg.batch_size]
        judged.append(judge_samples(judge, generate_samples(generator, batch, cfg, seed)))
    return pd.concat(judged, ignore_index=True) if judged else rows.iloc[0:0]


# ---- outputs -------------------------------------------------------------------------------------------------


def preference_rows(judged: pd.DataFrame, judge_name: str) -> pd.DataFrame:
    """One row per kept prompt: best sample chosen, worst rejected, in TRL's conversational vision format."""
    rows = []
    for row in judged.itertuples(index=False):
        if row.best < 0:
            continue
        samples, scores, tokens = list(row.samples), list(row.scores), list(row.sample_tokens)
        rows.append(
            {
                "images": [row.image],
                "prompt": prompts.preference_prompt(list(row.conversations)),
                "chosen": prompts.preference_completion(samples[row.best]),
                "rejected": prompts.preference_completion(samples[row.worst]),
                "example_id": str(row.example_id),
                "judge": judge_name,
                "verdicts": row.comparisons,
                "chosen_score": int(scores[row.best]),
                "rejected_score": int(scores[row.worst]),
                "chosen_len": int(tokens[row.best]),
                "rejected_len": int(tokens[row.worst]),
                "chosen_sample": int(row.best),
                "rejected_sample": int(row.worst),
            }
        )
    return pd.DataFrame(rows, columns=list(PREFERENCE_FEATURES))


def _preference_features():
    import datasets

    turn = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    return datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "prompt": turn,
            "chosen": turn,
            "rejected": turn,
            "example_id": datasets.Value("string"),
            "judge": datasets.Value("string"),
            "verdicts": datasets.Value("string"),
            **{
                c: datasets.Value("int64")
                for c in PREFERENCE_FEATURES
                if c.endswith(("_score", "_len", "_sample"))
            },
        }
    )


def write_preferences(df: pd.DataFrame, path: str | Path) -> None:
    """Parquet with HF datasets' schema metadata: ``datasets`` decodes ``images`` to PIL on load."""
    import datasets

    data = {c: df[c].tolist() for c in PREFERENCE_FEATURES}
    data["images"] = [[{"bytes": b, "path": None} for b in imgs] for imgs in data["images"]]
    datasets.Dataset.from_dict(data, features=_preference_features()).to_parquet(str(path))


def best_of_k_rows(judged: pd.DataFrame) -> pd.DataFrame:
    """Data-stage rows whose final answer is the judge's best sample (rejection sampling)."""
    rows = []
    for row in judged.itertuples(index=False):
        if row.best < 0:
            continue
        answer = list(row.samples)[row.best]
        rows.append(
            {
                "example_id": row.example_id,
                "image": row.image,
                "conversations": prompts.with_final_answer(list(row.conversations), answer),
                "source": row.source,
                "answer_type": row.answer_type,
                "group": row.group,
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_sft_data(best: pd.DataFrame, data_dir: str | Path, out_dir: Path) -> None:
    """A data-stage folder: best-of-K as ``train``, the data stage's own ``val`` and ``test`` beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    best.to_parquet(out_dir / FILES["data"]["train"], index=False)
    for split in ("val", "test"):
        shutil.copy2(Path(data_dir) / FILES["data"][split], out_dir / FILES["data"][split])


def sample_rows(judged: pd.DataFrame) -> pd.DataFrame:
    """Every sample: its answer, length, seed and tournament score, and whether it became chosen/rejected."""
    rows = []
    for row in judged.itertuples(index=False):
        for j, (answer, tokens, seed, score) in enumerate(
            zip(row.samples, row.sample_tokens, row.sample_seeds, row.scores, strict=True)
        ):
            rows.append(
                {
                    "example_id": row.example_id,
                    "sample": j,
                    "answer": answer,
                    "answer_tokens": int(tokens),
                    "seed": int(seed),
                    "score": int(score),
                    "chosen": j == row.best,
                    "rejected": j == row.worst,
                }
            )
    return pd.DataFrame(rows)


# ---- diagnostics ---------------------------------------------------------------------------------------------


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (scipy's; NaN when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _rate(metric: str, k: int, n: int, what: str) -> dict:
    lo, hi = wilson(k, n)
    return {
        "metric": metric,
        "k": k,
        "n": n,
        "rate": k / n if n else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "what": what,
    }


def verdicts_of(judged: pd.DataFrame) -> list[PairVerdict]:
    return [PairVerdict.from_dict(c) for text in judged["comparisons"] for c in json.loads(text)]


def diagnostics(judged: pd.DataFrame) -> pd.DataFrame:
    """Kept / tied prompts and the judge's biases, each a proportion with its 95% Wilson interval.

    Proportions over showings count both showings of a pair, which are not independent: read those
    intervals as somewhat too narrow.
    """
    verdicts = verdicts_of(judged)
    shown = [p for v in verdicts for p in v.presentations]
    decisive = [p for p in shown if p.verdict in (FIRST, SECOND)]
    both = [v for v in verdicts if all(p.verdict in (FIRST, SECOND) for p in v.presentations)]
    flips = sum(len({p.winner for p in v.presentations}) > 1 for v in both)
    # Only the self judge's letters are labels apart from positions ("first" / "second" are positions).
    label = prompts.SELF_JUDGE_LABELS[0]
    labelled = [p for p in decisive if label in p.labels]
    kept = judged[judged["best"] >= 0]
    chosen_len = [list(t)[b] for t, b in zip(kept["sample_tokens"], kept["best"], strict=True)]
    rejected_len = [list(t)[w] for t, w in zip(kept["sample_tokens"], kept["worst"], strict=True)]
    unequal = [(c, r) for c, r in zip(chosen_len, rejected_len, strict=True) if c != r]
    prompts_n = len(judged)
    rows = [
        _rate("kept", len(kept), prompts_n, "prompts whose best sample beats their worst (pairs written)"),
        _rate("ties", prompts_n - len(kept), prompts_n, "prompts dropped: best and worst sample tie"),
        _rate(
            "pair_ties",
            sum(v.winner == TIE for v in verdicts),
            len(verdicts),
            "judged pairs: tie or orders disagree",
        ),
        _rate(
            "unparsed",
            sum(p.verdict == UNPARSED for p in shown),
            len(shown),
            "showings with no readable verdict",
        ),
        _rate(
            "order_flip", flips, len(both), "pairs decided in both orders whose winner changes with the order"
        ),
        _rate(
            "first_position_win",
            sum(p.verdict == FIRST for p in decisive),
            len(decisive),
            "decisive showings won by the answer shown first",
        ),
        _rate(
            f"label_{label}_win",
            sum(p.winning_label == label for p in labelled),
            len(labelled),
            f"decisive showings won by the answer labelled {label}",
        ),
        _rate(
            "longer_answer_win",
            sum(c > r for c, r in unequal),
            len(unequal),
            "kept pairs (unequal lengths) whose chosen answer is longer",
        ),
    ]
    return pd.DataFrame(rows)


def diagnostics_dict(table: pd.DataFrame) -> dict:
    """The diagnostics table as manifest metrics (NaN as None)."""
    out = {}
    for row in table.itertuples(index=False):
        out[row.metric] = {
            key: (None if isinstance(v, float) and math.isnan(v) else v)
            for key, v in (
                ("k", int(row.k)),
                ("n", int(row.n)),
                ("rate", row.rate),
                ("ci_low", row.ci_low),
                ("ci_high", row.ci_high),
            )
        }
    return out


def throughput(judged: pd.DataFrame) -> dict:
    """Generated tokens and tokens per second of generate time (summed over actors, so per actor)."""
    tokens = int(sum(sum(t) for t in judged["sample_tokens"]))
    gen_s = float(judged["gen_s"].sum())
    return {
        "generated_tokens": tokens,
        "generate_s": gen_s,
        "judge_s": float(judged["judge_s"].sum()),
        "tokens_per_s_per_actor": tokens / gen_s if gen_s > 0 else 0.0,
    }


def write_outputs(judged: pd.DataFrame, judge_name: str, data_dir: str | Path, out_dir: str | Path) -> dict:
    """Write every output of the stage into ``out_dir``; returns the manifest's metrics."""
    out_dir = Path(out_dir)
    pairs = preference_rows(judged, judge_name)
    write_preferences(pairs, out_dir / PAIRS)
    best = best_of_k_rows(judged)
    write_sft_data(best, data_dir, out_dir / BEST_OF_K)
    sample_rows(judged).to_parquet(out_dir / SAMPLES, index=False)
    table = diagnostics(judged)
    table.to_parquet(out_dir / DIAGNOSTICS, index=False)
    return {
        "prompts": len(judged),
        "pairs": len(pairs),
        "best_of_k": len(best),
        "diagnostics": diagnostics_dict(table),
        **throughput(judged),
    }
