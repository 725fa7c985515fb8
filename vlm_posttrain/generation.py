"""Batched answer generation from a VLM policy (the base model, optionally with a LoRA adapter).

Shared by the pairs stage, the evaluation stage and the throughput benchmark, so nothing here knows about
preference pairs. One ``generate`` call per batch: prompts are left-padded (the processor's tokenizer is set
to left padding at load) and each prompt is repeated ``k`` times inside that one call.

Sampling is reproducible per row, independent of how rows are batched: HF ``generate`` takes one global RNG,
so instead of ``do_sample=True`` each sequence draws Gumbel noise from its own ``torch.Generator`` seeded
from (row seed, sample index), and the greedy argmax over ``logits / T + noise`` is an exact sample from the
temperature / top-p distribution (the Gumbel-max trick). Temperature 0 is plain greedy decoding.

    gen = Generator.load(base_dir, cfg.model, adapter_dir)
    prompts = [gen.prompt(row.conversations) for row in rows]
    out = gen.generate(images, prompts, k=2, sampling=Sampling(0.7, 1.0, 64), seeds=[11, 12])
    out.texts[row][sample], out.tokens[row][sample], out.tokens_per_s
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from vlm_posttrain import families, modeling, prompts
from vlm_posttrain.config import ModelConfig


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128


@dataclass
class Completions:
    """``texts[i][j]``: sample j of prompt i (stripped); ``tokens``: its generated length before EOS."""

    texts: list[list[str]]
    tokens: list[list[int]]
    seeds: list[list[int]]
    seconds: float
    meta: dict = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return sum(sum(row) for row in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def derive_seed(*parts) -> int:
    """A stable 60-bit seed from any JSON-able parts (run seed, example id, sample index)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int(hashlib.sha256(blob).hexdigest()[:15], 16)


class SeededGumbelSampler(LogitsProcessor):
    """Per-sequence seeded sampling inside greedy decoding: returns ``logits / T`` (top-p filtered) + Gumbel noise.

    The argmax of that is a sample from softmax(logits / T) restricted to the top-p set; each sequence's
    noise comes from its own generator, so its sample depends on its seed only, not on its batch.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device):
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        noise = torch.empty_like(scores)
        for row, gen in enumerate(self.generators):
            # -log(Exp(1)) is Gumbel(0, 1).
            noise[row].exponential_(generator=gen)
        return scores - noise.log()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def to_device(inputs: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Move a processor's output to the model; pixel values take the model's float dtype."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def repeat_rows(inputs: dict, k: int) -> dict:
    """Each row k times in a row (what ``num_return_sequences`` does inside generate)."""
    if k == 1:
        return inputs
    return {
        key: value.repeat_interleave(k, dim=0) if isinstance(value, torch.Tensor) else value
        for key, value in inputs.items()
    }


def eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return ids or [tokenizer.eos_token_id]


def encode_rows(processor, images: Sequence, texts: Sequence[str]) -> list[dict]:
    """Each (image, prompt) through the processor on its own, unpadded, as numpy arrays (``input_ids`` with
    the image tokens expanded, ``pixel_values``, ...): CPU work a Ray Data task does ahead of the model's actor.
    A family's per-image patch lists (Qwen2-VL's ``pixel_values``, ``image_grid_thw``) are kept whole; every
    other output loses its batch axis of one.
    """
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images for {len(texts)} prompts; give one image per prompt")
    flat = families.of_processor(processor).flat_vision_keys
    rows = []
    for image, text in zip(images, texts, strict=True):
        # The template writes every special token, its BOS too: the tokenizer adds none, as in TRL's collators.
        out = processor(text=[text], images=[image], return_tensors="np", add_special_tokens=False)
        rows.append({k: v if k in flat else v[0] for k, v in out.items() if k != "attention_mask"})
    return rows


def _pad_first_axis(arrays: list[np.ndarray]) -> np.ndarray:
    # LLaVA-OneVision's patch count varies with the image's aspect; its model reads only each image's own
    # patches (by image_sizes), so zero patches fill the rest, as its processor pads a batch itself.
    longest = max(a.shape[0] for a in arrays)
    return np.stack(
        [np.concatenate([a, np.zeros((longest - len(a), *a.shape[1:]), a.dtype)]) for a in arrays]
    )


def collate(processor, rows: Sequence[dict]) -> dict:
    """Rows of :func:`encode_rows` as one batch, as the processor itself batches: ``input_ids`` left-padded by
    the tokenizer (its padding side is set at load) and per-token type ids with it; per-image patch lists
    concatenated; every other array stacked, padded along its first axis where images differ in size."""
    flat = families.of_processor(processor).flat_vision_keys
    ids = [np.asarray(r["input_ids"]).tolist() for r in rows]
    batch = dict(processor.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt"))
    width = batch["input_ids"].shape[1]
    for key in rows[0]:
        if key == "input_ids":
            continue
        arrays = [np.asarray(r[key]) for r in rows]
        if key in flat:
            batch[key] = torch.from_numpy(np.concatenate(arrays))
        elif all(a.ndim == 1 and len(a) == len(i) for a, i in zip(arrays, ids, strict=True)):
            left = processor.tokenizer.padding_side == "left"
            pads = [(width - len(a), 0) if left else (0, width - len(a)) for a in arrays]
            batch[key] = torch.from_numpy(
                np.stack([np.pad(a, pad) for a, pad in zip(arrays, pads, strict=True)])
            )
        elif len({a.shape for a in arrays}) > 1:
            batch[key] = torch.from_numpy(_pad_first_axis(arrays))
        else:
            batch[key] = torch.from_numpy(np.stack(arrays))
    return batch


class Generator:
    """A loaded policy that answers batches of (image, prompt) with k samples each."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = model_device(model)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    @classmethod
    def load(
        cls, base_dir: str | Path, model_cfg: ModelConfig, adapter_dir: str | Path | None = None
    ) -> Generator:
        model = modeling.load_policy(base_dir, model_cfg, adapter_dir)
        return cls(model, modeling.load_processor(str(base_dir), model_cfg.trust_remote_code))

    def prompt(self, conversations: list[dict], system_prompt: str = "") -> str:
        """The generation prompt, byte-identical to the SFT rendering up to the answer."""
        return prompts.generation_prompt(self.processor, list(conversations), system_prompt)

    def encode(self, images: Sequence, texts: Sequence[str]) -> dict:
        # The template writes every special token, its BOS too: the tokenizer adds none, as in TRL's collators.
        inputs = self.processor(
            text=list(texts), images=list(images), return_tensors="pt", padding=True, add_special_tokens=False
        )
        return to_device(dict(inputs), self.device, self.dtype)

    def collate(self, rows: Sequence[dict]) -> dict:
        """Rows from :func:`encode_rows` as one left-padded batch on the model's device."""
        return to_device(collate(self.processor, rows), self.device, self.dtype)

    def generate(
        self,
        images: Sequence,
        texts: Sequence[str],
        k: int = 1,
        sampling: Sampling = Sampling(),
        seeds: Sequence[int] | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> Completions:
        """k answers per prompt in one ``generate`` call; ``seeds`` (one per prompt) make sampling reproducible.

        ``adapter_names`` (one per prompt, on a PeftModel) routes each prompt through its own LoRA adapter, or
        through none with PEFT's ``"__base__"``, so one batch can serve several model variants.
        """
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} prompts; give one image per prompt")
        start = time.perf_counter()
        inputs = self.encode(images, texts)
        return self._generate(inputs, k, sampling, seeds, adapter_names, start)

    def generate_encoded(
        self,
        rows: Sequence[dict],
        k: int = 1,
        sampling: Sampling = Sampling(),
        seeds: Sequence[int] | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> Completions:
        """:meth:`generate` on prompts already through the processor (:func:`encode_rows`, one per prompt)."""
        start = time.perf_counter()
        return self._generate(self.collate(rows), k, sampling, seeds, adapter_names, start)

    def _generate(
        self, inputs: dict, k, sampling: Sampling, seeds, adapter_names, start: float
    ) -> Completions:
        n = int(inputs["input_ids"].shape[0])
        if adapter_names is not None and len(adapter_names) != n:
            raise ValueError(f"{len(adapter_names)} adapter names for {n} prompts; give one per prompt")
        seeds = list(seeds) if seeds is not None else [0] * n
        sample_seeds = [[derive_seed(seed, j) for j in range(k)] for seed in seeds]
        inputs = repeat_rows(inputs, k)
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos_ids(self.model, self.tokenizer),
        )
        processors = LogitsProcessorList()
        if sampling.temperature > 0:
            flat = [s for row in sample_seeds for s in row]
            processors.append(SeededGumbelSampler(flat, sampling.temperature, sampling.top_p, self.device))
        routing = {}
        if adapter_names is not None:
            routing["adapter_names"] = [name for name in adapter_names for _ in range(k)]
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, generation_config=config, logits_processor=processors, **routing
            )
        new = out[:, inputs["input_ids"].shape[1] :].cpu()
        seconds = time.perf_counter() - start
        texts_out, lengths = self._decode(new)
        return Completions(
            texts=[texts_out[i * k : (i + 1) * k] for i in range(n)],
            tokens=[lengths[i * k : (i + 1) * k] for i in range(n)],
            seeds=sample_seeds,
            seconds=seconds,
            meta={"prompt_tokens": int(inputs["input_ids"].shape[1]), "batch": n * k},
        )

    def _decode(self, new: torch.Tensor) -> tuple[list[str], list[int]]:
        stop = set(eos_ids(self.model, self.tokenizer)) | {self.tokenizer.pad_token_id}
        lengths = []
        for row in new.tolist():
            n = next((i for i, t in enumerate(row) if t in stop), len(row))
            lengths.append(n)
        texts = self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(new.tolist(), lengths, strict=True)], skip_special_tokens=True
        )
        return [t.strip() for t in texts], lengths
