"""What every Trainer of the project shares: the arguments SFT and DPO set alike, from their typed sections.

``SftConfig`` and ``DpoConfig`` name their common knobs alike (``batch_size``, ``grad_accum``, ``epochs``,
``learning_rate``, ``warmup_ratio``, ``weight_decay``, ``logging_steps``); each stage adds its own arguments:

    TrlSFTConfig(**trainer_kwargs(sft, out_dir, seed, "float32"), assistant_only_loss=True, ...)
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlm_posttrain.config import DpoConfig, SftConfig


def trainer_kwargs(
    section: SftConfig | DpoConfig, out_dir: str | Path, seed: int, compute_dtype: str
) -> dict:
    """transformers ``TrainingArguments`` common to both stages: steps, schedule, device and checkpointing."""
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        num_train_epochs=section.epochs,
        learning_rate=section.learning_rate,
        warmup_steps=section.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        weight_decay=section.weight_decay,
        logging_steps=section.logging_steps,
        # Every epoch's checkpoint (adapter, optimizer, scheduler, RNG) is what a restarted trial resumes from.
        save_strategy="epoch",
        save_total_limit=1,
        use_cpu=not cuda,
        bf16=cuda and compute_dtype == "bfloat16",
        fp16=False,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
