"""The SFT stage's work: one LoRA (or QLoRA) fine-tuning run of the base VLM with TRL's ``SFTTrainer``.

Each Tune trial (``trainables/sft.py``) calls :func:`train_trial` with its own typed config, the SFT section at
its grid point (``SftConfig.at``). Examples go to TRL as
``{"images": [PIL], "messages": [...]}`` rendered by the model family's training template, with
``assistant_only_loss`` so every assistant turn, and nothing else, is supervised (the study's labels were
never aligned with the prompt). Batches are padded to their longest example, not to a fixed length, and
nothing is truncated: an example whose prompt would lose image tokens is skipped or fails by policy first.

    metrics = train_trial(cfg.sft.trials()[0], cfg.model, base_dir, data_dir, out_dir, seed=0)
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from transformers import TrainerCallback
from trl import SFTConfig as TrlSFTConfig
from trl import SFTTrainer

from vlm_posttrain import families, modeling, prompts, training
from vlm_posttrain.config import ModelConfig, SftConfig
from vlm_posttrain.data import DataError, Rejects, decode_image, load_split


def token_length(processor, messages: list[dict], image_tokens: Sequence[int]) -> int:
    """Tokens of the rendered conversation with each image's placeholder expanded to its ``image_tokens``
    (:func:`families.image_tokens`: 576 per LLaVA-1.5 image; by the image's size for the other families)."""
    text = prompts.render(processor, messages)
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + sum(
        n - 1 for n in image_tokens
    )


def to_sft_dataset(
    df: pd.DataFrame, processor, max_length: int, bad_rows: str, system_prompt: str = ""
) -> tuple[datasets.Dataset, Rejects]:
    """TRL's vision-conversation rows; examples that would not fit ``max_length`` whole are counted out."""
    rejects = Rejects()
    records: list[dict[str, Any]] = []
    for row in df.itertuples(index=False):
        messages = prompts.to_messages(list(row.conversations), system_prompt)
        image = decode_image(row.image)
        n = token_length(processor, messages, [families.image_tokens(processor, image)])
        if n > max_length:
            if bad_rows == "fail":
                raise DataError(
                    f"row '{row.example_id}': {n} tokens exceed sft.max_length={max_length} and would cut the "
                    "example; raise sft.max_length or set data.bad_rows=skip"
                )
            rejects.add("too_long", row.example_id)
            continue
        records.append({"images": [image], "messages": messages})
    if not records:
        raise DataError(f"no example fits sft.max_length={max_length}; raise it")
    return datasets.Dataset.from_list(records), rejects


def trainer_args(
    sft: SftConfig, out_dir: Path, seed: int, compute_dtype: str, with_eval: bool
) -> TrlSFTConfig:
    """TRL's arguments for one trial, all from its own typed config (``SftConfig.at`` a grid point)."""
    return TrlSFTConfig(
        **training.trainer_kwargs(sft, out_dir, seed, compute_dtype),
        per_device_eval_batch_size=sft.batch_size,
        eval_strategy="epoch" if with_eval else "no",
        max_length=None,
        assistant_only_loss=True,
        save_only_model=False,
    )


def train_trial(
    sft: SftConfig,
    model_cfg: ModelConfig,
    base_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    bad_rows: str = "skip",
    callbacks: Sequence[TrainerCallback] = (),
    resume_from: str | None = None,
) -> dict:
    """Train one LoRA adapter as ``sft`` (one trial's config) says; returns final metrics.

    Checkpoints land in ``out_dir/checkpoint-*``.
    """
    out_dir = Path(out_dir)
    processor = modeling.load_processor(str(base_dir), model_cfg.trust_remote_code)
    train, train_rejects = to_sft_dataset(load_split(data_dir, "train"), processor, sft.max_length, bad_rows)
    val_df = load_split(data_dir, "val")
    val = to_sft_dataset(val_df, processor, sft.max_length, bad_rows)[0] if len(val_df) else None
    base = modeling.load_base(str(base_dir), model_cfg)
    lora = modeling.lora_config(sft, model_cfg.lora_target, families.of_processor(processor))
    model = modeling.attach_lora(base, lora, seed)
    trainer = SFTTrainer(
        model=model,
        args=trainer_args(sft, out_dir, seed, model_cfg.compute_dtype, val is not None),
        train_dataset=train,
        eval_dataset=val,
        processing_class=processor,
        callbacks=list(callbacks),
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {"train_loss": float(result.training_loss), "epoch": float(trainer.state.epoch or 0)}
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals:
        metrics["eval_loss"] = float(evals[-1]["eval_loss"])
    metrics["train_examples"] = len(train)
    metrics["skipped_too_long"] = train_rejects.counts.get("too_long", 0)
    return metrics


def pretrain_full(
    base_dir: str | Path,
    data_dirs: Sequence[str | Path],
    out_dir: str | Path,
    epochs: float,
    seed: int,
    lr: float = 1e-3,
) -> dict:
    """Full fine-tuning (no LoRA) of a small model: turns the random tiny LLaVA into an instruction-tuned base.

    1e-3: at 3e-3 the tiny base settles on one answer for every chart and never reads the image.
    """
    processor = modeling.load_processor(str(base_dir))
    model = modeling.load_base(str(base_dir), ModelConfig(name=str(base_dir)))
    rows = pd.concat([load_split(d, "train") for d in data_dirs], ignore_index=True)
    train, _ = to_sft_dataset(rows, processor, 10_000, "skip")
    # The Trainer needs an output_dir although nothing is saved there; a temporary one, removed after.
    with tempfile.TemporaryDirectory(prefix="pretrain-") as scratch:
        sft = SftConfig(epochs=epochs, learning_rate=lr, batch_size=8, logging_steps=50, warmup_ratio=0.05)
        args = trainer_args(sft, Path(scratch), seed, "float32", with_eval=False)
        args.save_strategy = "no"
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
        result = trainer.train()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"pretrain_loss": float(result.training_loss), "pretrain_examples": len(train)}
