"""The DPO stage's work: TRL's ``DPOTrainer`` continues the soup's (or last round's) adapter on pairs.

The policy is the base model with the starting adapter loaded *trainable* and no ``peft_config``, so TRL
copies that adapter into a frozen one named ``ref``: the reference is the starting policy, with no second
copy of the base model and nothing merged into (4-bit) base weights. The first logged loss must then be
the loss at zero margin (ln 2 for ``sigmoid``); a run whose first loss is not stops at once.

Pairs come in the preference-row layout (``images``, ``prompt``, ``chosen``, ``rejected`` in TRL's
conversational vision format) and are rendered by TRL's vision collator through the processor's chat
template, which ``modeling.load_processor`` sets to the family's training template: the same bytes as
SFT and evaluation. :class:`PreferenceCollator` tokenizes each answer after its prompt, so the tokens DPO
trains are the ones SFT supervises and generation emits. A pair whose prompt (image tokens included) plus
longer answer exceeds ``dpo.max_length`` is never truncated: it is skipped and counted under
``data.bad_rows: skip``, an error under ``fail`` (:func:`fit_pairs`, which the driver also runs before any
trial).

The saved adapter (``<out_dir>/policy/adapter``) is the trained ``default`` adapter alone: the whole
policy (soup + DPO update), loadable with ``PeftModel.from_pretrained(base, dir)``.

    metrics = train_dpo(cfg.dpo, cfg.model, base_dir, soup_dir / "adapter", pairs_path, out_dir, seed=0)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import TrainerCallback
from trl import DPOConfig as TrlDPOConfig
from trl import DPOTrainer
from trl.trainer import utils as trl_utils
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from vlm_posttrain import families, modeling, prompts, training
from vlm_posttrain.config import DpoConfig, ModelConfig
from vlm_posttrain.data import DataError, Rejects, decode_image
from vlm_posttrain.layout import FILES

PAIR_COLUMNS = ("images", "prompt", "chosen", "rejected")
PAIRS_FILE = FILES["pairs"]["pairs"]
# <out_dir>/policy/: the finished run, laid out as the DPO artifact (adapter/, curves.parquet) + summary.json
POLICY = "policy"
ADAPTER = FILES["dpo"]["adapter"]
CURVE = FILES["dpo"]["curves"]
SUMMARY = "summary.json"
REFERENCE = "ref"  # the name TRL gives the frozen copy of the starting adapter
CURVE_KEYS = (
    "step",
    "epoch",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
)


def zero_margin_loss(loss_type: str, beta: float) -> float:
    """The loss when policy and reference agree (every log-ratio 0): what the first step must log."""
    return {
        "sigmoid": math.log(2),
        "sigmoid_norm": math.log(2),
        "hinge": 1.0,
        "ipo": (1 / (2 * beta)) ** 2,
        "bco_pair": 2 * math.log(2),
        "apo_zero": 1.0,
    }[loss_type]


# ---- preference rows -> TRL's vision preference dataset ----------------------------------------------


def find_pairs(path: str | Path) -> Path:
    """The preference parquet: the file itself, or ``pairs.parquet`` (or the only parquet) in a folder."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / PAIRS_FILE] if (path / PAIRS_FILE).is_file() else sorted(path.glob("*.parquet"))
    if len(candidates) != 1:
        raise DataError(f"{path}: expected a preference parquet or a folder holding {PAIRS_FILE}")
    return candidates[0]


def load_pairs(path: str | Path) -> pd.DataFrame:
    file = find_pairs(path)
    df = pd.read_parquet(file)
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{file}: missing preference column(s) {', '.join(missing)}; re-run the pairs stage")
    if df.empty:
        raise DataError(f"{file}: no preference pairs; the pairs stage found no usable verdicts")
    return df


def _plain(value: Any) -> Any:
    """Parquet round-trips lists as arrays and merges struct fields (an image part gets ``text: None``):
    back to plain lists and dicts without the null fields, as TRL's message helpers expect."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def structured(messages: list[dict], n_images: int) -> list[dict]:
    """Messages with list contents, string contents converted the way TRL's collator converts them (the
    images before the text of the first user turn with string content), so what is measured here is what
    TRL renders. The pairs stage writes string contents; list contents pass unchanged."""
    out, placed = [], False
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                content = [{"type": "image"} for _ in range(n_images)] + content
                placed = True
        out.append({"role": message["role"], "content": content})
    return out


def decode_pair_image(value: Any) -> Image.Image:
    """One entry of ``images`` (raw bytes, a ``{bytes, path}`` struct, or a PIL image), by data.decode_image."""
    if isinstance(value, dict):
        value = value.get("bytes") or Path(value["path"]).read_bytes()
    return decode_image(value)


def render_pair(processor, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
    """(prompt text with the generation prompt, completion text), split where TRL's collator splits them.

    The prompt must be a prefix of the rendered prompt+completion, so that prompt + completion is byte for
    byte the SFT rendering of the same conversation.
    """
    prompt_text = prompts.render(processor, prompt, add_generation_prompt=True)
    full = prompts.render(processor, prompt + completion)
    if not full.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently with and without its answer")
    return prompt_text, full[len(prompt_text) :]


def pair_length(processor, prompt, chosen, rejected, image_tokens: Sequence[int]) -> tuple[int, int, int]:
    """Token counts of what the collator will build, each image's placeholder expanded to its
    ``image_tokens``: (through the last image token, the prompt, the prompt + the longer answer)."""

    def count(text: str) -> int:
        return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    placeholder = families.of_processor(processor).image_token
    prompt_text, chosen_text = render_pair(processor, prompt, chosen)
    _, rejected_text = render_pair(processor, prompt, rejected)
    extra = sum(n - 1 for n in image_tokens)
    last_image = prompt_text.rfind(placeholder) + len(placeholder)
    n_prompt = count(prompt_text) + extra
    longest = max(
        len(prompts.completion_ids(processor.tokenizer, prompt_text, text))
        for text in (chosen_text, rejected_text)
    )
    return count(prompt_text[:last_image]) + extra, n_prompt, n_prompt + longest


def _cut(image_end: int, n_prompt: int, max_length: int) -> str:
    if image_end > max_length:
        return "image tokens"
    return "the prompt" if n_prompt > max_length else "the answer"


def _too_long(row_id: str, n: int, n_prompt: int, image_tokens: int, max_length: int, cut: str) -> str:
    return (
        f"pair '{row_id}': {n} tokens (the prompt {n_prompt}, {image_tokens} of them image tokens) exceed "
        f"dpo.max_length={max_length} and would cut {cut}; raise dpo.max_length or set data.bad_rows=skip"
    )


def fit_pairs(
    pairs_df: pd.DataFrame, processor, max_length: int, bad_rows: str
) -> tuple[pd.DataFrame, Rejects]:
    """The pairs that fit ``max_length`` whole (prompt with its image tokens + the longer answer). A longer
    pair is dropped and counted as ``too_long`` under ``data.bad_rows: skip``, an error naming it under
    ``fail``; DPO never truncates one. Run by the driver before any trial, and by the trial on the same rows."""
    rejects, keep = Rejects(), []
    for i, row in enumerate(pairs_df.to_dict("records")):
        row_id = row.get("example_id", f"#{i}")
        images = [decode_pair_image(v) for v in _plain(row["images"])]
        image_tokens = [families.image_tokens(processor, image) for image in images]
        prompt = structured(_plain(row["prompt"]), len(images))
        chosen, rejected = (structured(_plain(row[c]), 0) for c in ("chosen", "rejected"))
        image_end, n_prompt, n = pair_length(processor, prompt, chosen, rejected, image_tokens)
        fits = n <= max_length
        if not fits and bad_rows == "fail":
            cut = _cut(image_end, n_prompt, max_length)
            raise DataError(_too_long(row_id, n, n_prompt, sum(image_tokens), max_length, cut))
        if not fits:
            rejects.add("too_long", row_id)
        keep.append(fits)
    return pairs_df[keep].reset_index(drop=True), rejects


def to_dpo_dataset(pairs_df: pd.DataFrame, processor, max_length: int | None) -> datasets.Dataset:
    """TRL's vision preference rows. With ``max_length``, fails naming the row when a pair would not fit it
    whole (:func:`fit_pairs` under ``fail``); ``None`` for rows :func:`fit_pairs` has already kept."""
    if max_length is not None:
        fit_pairs(pairs_df, processor, max_length, "fail")
    records = []
    for i, row in enumerate(pairs_df.to_dict("records")):
        row_id = row.get("example_id", f"#{i}")
        images = [decode_pair_image(v) for v in _plain(row["images"])]
        prompt = structured(_plain(row["prompt"]), len(images))
        chosen, rejected = (structured(_plain(row[c]), 0) for c in ("chosen", "rejected"))
        placeholders = sum(1 for m in prompt for p in m["content"] if p["type"] == "image")
        if not images or placeholders != len(images):
            raise DataError(
                f"pair '{row_id}': {len(images)} image(s) for {placeholders} image placeholder(s) in the "
                "prompt; every pair needs its image in the prompt"
            )
        records.append({"images": images, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return datasets.Dataset.from_list(records)


# ---- collation ---------------------------------------------------------------------------------------------


class PreferenceCollator(DataCollatorForVisionPreference):
    """TRL's vision preference collator, with each completion tokenized after its prompt.

    TRL 1.16 tokenizes ``" answer</s>"`` on its own, which under Llama-2's normalizer starts with an extra
    "▁" token that SFT never trains and generation never emits. Here the prompt (with its images) goes
    through the processor as in TRL, and each completion's tokens are those of prompt + completion
    tokenized together, split at the prompt (:func:`prompts.completion_ids`): the chosen and rejected
    tokens are the ones SFT supervises for the same answer after the same prompt. Nothing is truncated
    (every pair was checked against ``dpo.max_length`` before training). Rows are TRL's conversational vision
    preference rows, string or list contents.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.processor.tokenizer
        prompt_texts, chosen, rejected = [], [], []
        for example in examples:
            prompt = structured(_plain(example["prompt"]), len(example["images"]))
            chosen_turns, rejected_turns = (structured(_plain(example[c]), 0) for c in ("chosen", "rejected"))
            prompt_text, chosen_text = render_pair(self.processor, prompt, chosen_turns)
            _, rejected_text = render_pair(self.processor, prompt, rejected_turns)
            prompt_texts.append(prompt_text)
            chosen.append(prompts.completion_ids(tok, prompt_text, chosen_text))
            rejected.append(prompts.completion_ids(tok, prompt_text, rejected_text))
        images = [example["images"] for example in examples] * 2  # chosen rows, then rejected rows
        output = self.processor(
            images=images,
            text=prompt_texts * 2,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,  # the template wrote the BOS
        )
        completions = [torch.tensor(ids, dtype=torch.long) for ids in chosen + rejected]
        completion_ids = trl_utils.pad(completions, padding_value=tok.pad_token_id, padding_side="right")
        completion_mask = trl_utils.pad(
            [torch.ones_like(c) for c in completions], padding_value=0, padding_side="right"
        )
        prompt_mask = output["attention_mask"]
        # Per-token type ids (Qwen2-VL's mm_token_type_ids, Gemma's token_type_ids) run along the prompt: the
        # completion's are 0 (text), and they are flushed with the rest, as in TRL's own collator.
        typed = sorted(families.TOKEN_TYPE_KEYS & output.keys())
        flushed = trl_utils.flush_left(
            torch.cat((prompt_mask, completion_mask), dim=1),
            torch.cat((output["input_ids"], completion_ids), dim=1),
            torch.cat((torch.zeros_like(prompt_mask), completion_mask), dim=1),
            *(torch.cat((output[k], torch.zeros_like(completion_ids)), dim=1) for k in typed),
        )
        output["attention_mask"], output["input_ids"], output["completion_mask"] = flushed[:3]
        output.update(zip(typed, flushed[3:], strict=True))
        return output


# ---- the policy and the trainer -------------------------------------------------------------------------


def trainer_args(dpo: DpoConfig, out_dir: Path, seed: int, compute_dtype: str) -> TrlDPOConfig:
    return TrlDPOConfig(
        **training.trainer_kwargs(dpo, out_dir, seed, compute_dtype),
        # TRL logs the mean of per-batch means; one pair per batch makes eval_rewards/accuracies the exact
        # share of held-out pairs whose implicit reward margin is positive.
        per_device_eval_batch_size=1,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        # Every pair was checked to fit dpo.max_length whole; TRL must cut nothing.
        max_length=None,
        # Not supported for vision data; the reference runs beside the policy (the `ref` adapter).
        precompute_ref_log_probs=False,
        # Step 1 on its own: its loss is the zero-margin check of the reference.
        logging_first_step=True,
    )


def match_reference_dtype(model) -> None:
    """TRL casts the trainable adapter to bf16 on a 4-bit base but leaves its ``ref`` copy in fp32; cast the
    copy alike so the reference equals the starting policy exactly."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{REFERENCE}." in name:
            policy = params.get(name.replace(f".{REFERENCE}.", ".default."))
            if policy is not None and policy.dtype != param.dtype:
                param.data = param.data.to(policy.dtype)


def build_trainer(
    dpo: DpoConfig,
    model_cfg: ModelConfig,
    base_dir: str | Path,
    start_adapter_dir: str | Path,
    train: datasets.Dataset,
    processor,
    out_dir: Path,
    seed: int,
    callbacks: Sequence[TrainerCallback] = (),
    heldout: datasets.Dataset | None = None,
) -> DPOTrainer:
    policy = modeling.load_policy(base_dir, model_cfg, start_adapter_dir, trainable=True)
    trainer = DPOTrainer(
        model=policy,
        args=trainer_args(dpo, out_dir, seed, model_cfg.compute_dtype),
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=processor,
        data_collator=PreferenceCollator(processor),
        callbacks=[ReferenceCheck(zero_margin_loss(dpo.loss_type, dpo.beta)), *callbacks],
    )
    if REFERENCE not in trainer.model.peft_config:
        raise RuntimeError("TRL kept no frozen copy of the starting adapter; the reference would be the base")
    match_reference_dtype(trainer.model)
    return trainer


class ReferenceCheck(TrainerCallback):
    """Stops the run at step 1 unless its loss is the zero-margin loss (else the reference is wrong)."""

    def __init__(self, expected: float, tolerance: float = 1e-2):
        self.expected, self.tolerance = expected, tolerance
        self.first_loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.first_loss is not None or not logs or "loss" not in logs or state.global_step != 1:
            return
        self.first_loss = float(logs["loss"])
        if abs(self.first_loss - self.expected) > self.tolerance:
            raise RuntimeError(
                f"first DPO loss {self.first_loss:.4f}, expected {self.expected:.4f} at zero margin: the "
                "reference model is not the starting policy"
            )


# ---- the stage's core function -------------------------------------------------------------------------


def learning_curve(log_history: list[dict]) -> pd.DataFrame:
    """The Trainer's training logs (one row per logging step): step, loss, rewards/*, logps/*."""
    rows = [{k: h[k] for k in CURVE_KEYS if k in h} for h in log_history if "loss" in h and "step" in h]
    return pd.DataFrame(rows, columns=[k for k in CURVE_KEYS if any(k in r for r in rows)])


def save_policy(trainer: DPOTrainer, folder: Path, metrics: dict) -> None:
    """The trained adapter alone (not ``ref``), the learning curve and the summary, in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(folder / ADAPTER), selected_adapters=["default"])
    learning_curve(trainer.state.log_history).to_parquet(folder / CURVE, index=False)
    (folder / SUMMARY).write_text(json.dumps(metrics, indent=2))


def split_heldout(pairs: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out): ``fraction`` of the prompts, drawn with ``seed``, with all their pairs held out."""
    key = pairs["example_id"] if "example_id" in pairs else pairs.index.to_series()
    prompts = key.drop_duplicates().sort_values().to_numpy()
    # At least one prompt when asked for any, and never all of them: training needs a pair.
    n_held = min(max(int(round(fraction * len(prompts))), int(fraction > 0)), max(len(prompts) - 1, 0))
    held = set(np.random.default_rng(seed).permutation(prompts)[:n_held].tolist())
    mask = key.isin(held).to_numpy()
    return pairs[~mask], pairs[mask]


def heldout_metrics(trainer: DPOTrainer, n_heldout: int) -> dict:
    """The trained policy's implicit reward on held-out pairs: the share with a positive margin, the mean."""
    if not n_heldout:
        return {"heldout_pairs": 0}
    ev = trainer.evaluate()
    return {
        "heldout_pairs": n_heldout,
        "heldout/margin_positive": float(ev["eval_rewards/accuracies"]),
        "heldout/margin_mean": float(ev["eval_rewards/margins"]),
    }


def train_dpo(
    dpo_cfg: DpoConfig,
    model_cfg: ModelConfig,
    base_dir: str | Path,
    start_adapter_dir: str | Path,
    pairs_path: str | Path,
    out_dir: str | Path,
    seed: int,
    callbacks: Sequence[TrainerCallback] = (),
    resume_from: str | None = None,
    bad_rows: str = "fail",
) -> dict:
    """One DPO run from the starting adapter; the policy lands in ``out_dir/policy/``; returns its metrics."""
    out_dir = Path(out_dir)
    processor = modeling.load_processor(str(base_dir), model_cfg.trust_remote_code)
    pairs, rejects = fit_pairs(load_pairs(pairs_path), processor, dpo_cfg.max_length, bad_rows)
    if pairs.empty:
        raise DataError(
            f"{find_pairs(pairs_path)}: no pair fits dpo.max_length={dpo_cfg.max_length} whole; raise it"
        )
    train_df, held_df = split_heldout(pairs, dpo_cfg.holdout_fraction, seed)
    # fit_pairs has measured every kept pair
    train = to_dpo_dataset(train_df, processor, None)
    heldout = to_dpo_dataset(held_df, processor, None) if len(held_df) else None
    trainer = build_trainer(
        dpo_cfg, model_cfg, base_dir, start_adapter_dir, train, processor, out_dir, seed, callbacks, heldout
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    curve = learning_curve(trainer.state.log_history)
    last = curve.iloc[-1].to_dict() if len(curve) else {}
    metrics = {
        "train_loss": float(result.training_loss),
        "first_loss": float(curve["loss"].iloc[0]) if len(curve) else float("nan"),
        "epoch": float(trainer.state.epoch or 0),
        "steps": int(trainer.state.global_step),
        "train_pairs": len(train),
        "pairs_too_long": rejects.counts.get("too_long", 0),
        **{k: float(v) for k, v in last.items() if k.startswith(("rewards/", "logps/"))},
        **heldout_metrics(trainer, len(held_df)),
    }
    save_policy(trainer, out_dir / POLICY, metrics)
    return metrics
