"""The evaluation stage's work: answer the test split with every model variant, then score every answer.

A variant is the base model or the base plus one adapter (an SFT trial, a soup, a DPO round). The base is
loaded once and each adapter is attached as a named PEFT adapter; each row of a batch is routed through its
variant's adapter, so a pool of actors answers for all variants at full batch without reloading 7B weights.
Decoding is greedy by default; with ``samples > 1`` each example's samples are seeded from (run seed, example
id), the same seeds for every variant, so paired comparisons share their randomness.

Judges fill ``<judge>/score`` (0-100, NaN where unparsed, never 0) and ``<judge>/raw``:
- ``reference``: :func:`vlm_posttrain.reference.score_reference` against the test answer.
- ``critic``: LLaVA-Critic's pointwise prompt in the critic's own template, with the image. ``generate``
  reads the score the critic states (:func:`parse_critic_score`); ``expected`` is the probability-weighted
  score over candidate scores right after a fixed opening, which never fails to parse.

    answerer = VariantAnswerer(base_dir, model_cfg, [Variant("base", None), Variant("soup/delta_mean", path)])
    rows = answerer.answer_rows(tasks, sampling, samples=1, seed=0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from peft import PeftModel

from vlm_posttrain import modeling, prompts
from vlm_posttrain.config import EvalConfig, ModelConfig
from vlm_posttrain.data import decode_image
from vlm_posttrain.generation import Generator, Sampling, derive_seed, encode_rows

# PEFT's name for "no adapter" in a mixed-adapter batch.
BASE_ADAPTER = "__base__"
# The processor outputs a prepared task may carry: LLaVA-1.5's, then LLaVA-OneVision's and Qwen2-VL's extras.
ENCODED = (
    "input_ids",
    "pixel_values",
    "image_sizes",
    "batch_num_images",
    "mm_token_type_ids",
    "image_grid_thw",
)


@dataclass(frozen=True)
class Variant:
    name: str
    adapter: str | None = None


def prepare_tasks(processor, tasks: pd.DataFrame) -> pd.DataFrame:
    """The CPU half of answering: each task's image decoded and its prompt (with its system prompt) run through
    the processor; adds the processor's arrays as columns (:data:`ENCODED`)."""
    images = [decode_image(b) for b in tasks["image"]]
    texts = [
        prompts.generation_prompt(processor, list(c), p)
        for c, p in zip(tasks["conversations"], tasks["system_prompt"], strict=True)
    ]
    encoded = pd.DataFrame(encode_rows(processor, images, texts), index=tasks.index)
    unknown = set(encoded.columns) - set(ENCODED)
    if unknown:
        raise ValueError(
            f"processor outputs {sorted(unknown)}: prepared answering knows only {', '.join(ENCODED)}; "
            "add the family's outputs to vlm_posttrain.eval.ENCODED"
        )
    return pd.concat([tasks, encoded[encoded_columns(encoded)]], axis=1)


def encoded_columns(tasks: pd.DataFrame) -> list[str]:
    """The processor outputs a prepared frame carries, in :data:`ENCODED` order."""
    return [c for c in ENCODED if c in tasks.columns]


class VariantAnswerer:
    """The base model once, every variant's adapter attached by name; answers mixed batches of test rows.

    One ``generate`` call per batch, whatever variants it mixes: PEFT routes each row through its own
    adapter (``adapter_names``), so a batch is as wide as configured, not as wide as one variant's share.
    """

    def __init__(self, base_dir: str | Path, model_cfg: ModelConfig, variants: Sequence[Variant]):
        device_map = "cuda" if torch.cuda.is_available() else None
        processor = modeling.load_processor(str(base_dir), model_cfg.trust_remote_code)
        model = modeling.load_base(str(base_dir), model_cfg, device_map=device_map)
        self.adapter_names: dict[str, str | None] = {}
        for i, variant in enumerate(variants):
            name = f"v{i}" if variant.adapter else None
            if variant.adapter:
                model = modeling.load_adapter(model, variant.adapter, name=name)
            self.adapter_names[variant.name] = name
        self.generator = Generator(model.eval(), processor)

    def _check(self, variant: str) -> str | None:
        if variant not in self.adapter_names:
            raise KeyError(f"variant '{variant}' was not loaded; loaded: {', '.join(self.adapter_names)}")
        return self.adapter_names[variant]

    @contextmanager
    def active(self, variant: str):
        """Route the forward pass through one variant's adapter, or through none for the base."""
        model, name = self.generator.model, self._check(variant)
        if name is None:
            with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
                yield
        else:
            model.set_adapter(name)
            yield

    def routing(self, variants: Sequence[str]) -> list[str] | None:
        """PEFT's per-row adapter names for these variants (None when no adapter is loaded at all)."""
        names = [self._check(v) for v in variants]
        if not isinstance(self.generator.model, PeftModel):
            return None
        return [name or BASE_ADAPTER for name in names]

    def answer_rows(self, tasks: pd.DataFrame, sampling: Sampling, samples: int, seed: int) -> list[dict]:
        """One output row per (task, sample); tasks need variant, system_prompt, example_id, image, conversations
        and, when a Ray Data task prepared them (:func:`prepare_tasks`), ``input_ids`` and ``pixel_values``."""
        if "input_ids" not in tasks:
            tasks = prepare_tasks(self.generator.processor, tasks)
        conversations = [list(c) for c in tasks["conversations"]]
        encoded = tasks[encoded_columns(tasks)].to_dict("records")
        seeds = [derive_seed(seed, example_id) for example_id in tasks["example_id"]]
        variants = list(tasks["variant"])
        single = len(set(variants)) == 1
        # A batch of one variant runs with its adapter alone active: PEFT's per-row routing gathers and
        # scatters rows in every LoRA layer at every step (tiny model, batch 64: 16.7 vs 10 ms a step).
        with self.active(variants[0]) if single else nullcontext():
            out = self.generator.generate_encoded(
                encoded,
                k=samples,
                sampling=sampling,
                seeds=seeds,
                adapter_names=None if single else self.routing(variants),
            )
        latency = out.seconds / max(1, len(tasks))
        rows: list[dict] = []
        for i, task in enumerate(tasks.itertuples(index=False)):
            for j in range(samples):
                rows.append(
                    {
                        "variant": task.variant,
                        "system_prompt": task.system_prompt,
                        "example_id": task.example_id,
                        "sample": j,
                        "question": prompts.final_question(conversations[i]),
                        "reference": prompts.final_answer(conversations[i]),
                        "answer_type": task.answer_type,
                        "answer": out.texts[i][j],
                        "answer_tokens": out.tokens[i][j],
                        "latency_s": latency,
                    }
                )
        return rows


# The score the critic states: "... a score of 85", "Score: 85/100", "I would rate it 8 out of 10",
# "Rating: 7.5/10". Any other number in the text (values read off the chart, years) is not the score.
_SCALED = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*(100|10|5)\b", re.IGNORECASE)
_NAMED = re.compile(
    r"\b(?:score|rating|rate|grade)\b(?:\s+(?:it|this|the|response|answer|of|is|as|would|be|a|an|final|overall))*"
    r"\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)",
    re.IGNORECASE,
)


def parse_critic_score(text: str | None) -> float:
    """The score the critic states, on 0-100; NaN when it states none or one out of range (never a guess).

    A score with its scale ("7/10", "85 out of 100") wins; else a number introduced as the score ("Score: 85",
    "a score of 85", "I would rate it 85"), read on the 100 scale. When the critic states several, the last one
    is its final verdict.
    """
    if not text:
        return math.nan
    scaled = _SCALED.findall(text)
    if scaled:
        value, scale = scaled[-1]
        score = float(value) / float(scale) * 100
    else:
        named = _NAMED.findall(text)
        if not named:
            return math.nan
        score = float(named[-1])
    return score if 0.0 <= score <= 100.0 else math.nan


class CriticScorer:
    """A critic VLM scoring answers pointwise, by parsing its text or by expected score over score tokens."""

    def __init__(self, model, processor, mode: str, max_new_tokens: int, step: int = 10):
        if mode not in ("generate", "expected"):
            raise ValueError(f"critic mode '{mode}': choose generate or expected")
        self.critic = Generator(model, processor)
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.candidates = list(range(0, 101, step))

    @classmethod
    def load(cls, cfg: EvalConfig) -> CriticScorer:
        """``eval.critic_model``, read by ``eval.critic_mode``, writing up to ``eval.critic_max_new_tokens``."""
        return cls(*modeling.load_critic(cfg.critic_model), cfg.critic_mode, cfg.critic_max_new_tokens)

    def score(self, images: Sequence, questions: Sequence[str], answers: Sequence[str]) -> tuple[list, list]:
        texts = [
            prompts.critic_pointwise_prompt(self.critic.processor, q, a)
            for q, a in zip(questions, answers, strict=True)
        ]
        if self.mode == "generate":
            greedy = Sampling(temperature=0.0, max_new_tokens=self.max_new_tokens)
            replies = [r[0] for r in self.critic.generate(list(images), texts, k=1, sampling=greedy).texts]
            return [parse_critic_score(r) for r in replies], replies
        return self._expected(images, texts)

    def _expected(self, images: Sequence, texts: Sequence[str]) -> tuple[list, list]:
        """Σ p(score)·score over the candidate scores, each written as " {n}/100" after the fixed prefix."""
        scores, raws = [], []
        tok = self.critic.tokenizer
        for image, text in zip(images, texts, strict=True):
            head = text + prompts.CRITIC_SCORE_PREFIX
            fulls = [f"{head} {n}/100" for n in self.candidates]
            n_tail = [
                sum(
                    1
                    for s, _ in tok(f, return_offsets_mapping=True, add_special_tokens=False)[
                        "offset_mapping"
                    ]
                    if s >= len(head)
                )
                for f in fulls
            ]
            logp = self._continuation_logprobs([image] * len(fulls), fulls, n_tail)
            probs = torch.softmax(logp, dim=0)
            expected = float(sum(p * n for p, n in zip(probs.tolist(), self.candidates, strict=True)))
            scores.append(expected)
            raws.append(
                " ".join(f"{n}:{p:.3f}" for n, p in zip(self.candidates, probs.tolist(), strict=True))
            )
        return scores, raws

    def _continuation_logprobs(self, images: list, texts: list[str], n_tail: list[int]) -> torch.Tensor:
        gen = self.critic
        inputs = gen.encode(images, texts)
        with torch.inference_mode():
            logits = gen.model(**inputs).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        ids = inputs["input_ids"][:, 1:]
        token_logp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        # Left padding: every text ends at the last position, so its continuation is its last n tokens.
        return torch.stack([token_logp[i, -n:].sum() for i, n in enumerate(n_tail)])


def critic_scores(scorer: CriticScorer, rows: pd.DataFrame, images: Sequence) -> pd.DataFrame:
    scores, raws = scorer.score(images, list(rows["question"]), list(rows["answer"]))
    return rows.assign(**{"critic/score": scores, "critic/raw": raws})
