"""The Tune function trainable for one DPO run: a few lines around ``vlm_posttrain.dpo.train_dpo``.

Loss, rewards (chosen, rejected, margins, accuracies) and log-probabilities go to Tune at every logging
step; every epoch's Trainer checkpoint (both adapters, optimizer, scheduler, RNG state) becomes a Tune
checkpoint, so a restarted trial resumes where its last epoch ended. The finished policy folder
(``adapter/``, ``metrics.parquet``, ``summary.json``) is the trial's last checkpoint. Used by
``ray_jobs/dpo.py``:

    tune.with_parameters(train_dpo_trial, setup=DpoSetup(...))
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from transformers import TrainerCallback

from ray_jobs.session import stop_on_input_error
from vlm_posttrain.config import DpoConfig, ModelConfig
from vlm_posttrain.dpo import CURVE_KEYS, POLICY, SUMMARY, train_dpo


@dataclass(frozen=True)
class DpoSetup:
    dpo: DpoConfig
    model: ModelConfig
    base_dir: str
    start_adapter_dir: str
    pairs_path: str
    seed: int
    bad_rows: str = "fail"


class TuneReport(TrainerCallback):
    """Forwards the Trainer's training logs to Tune and each epoch's checkpoint as a Tune checkpoint."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            tune.report({k: float(logs[k]) for k in CURVE_KEYS if k in logs} | {"step": state.global_step})

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tune.report(
            {"step": state.global_step, "epoch": state.epoch},
            checkpoint=tune.Checkpoint.from_directory(str(ckpt)),
        )


@stop_on_input_error
def train_dpo_trial(config: dict, setup: DpoSetup) -> None:
    out_dir = Path(tune.get_context().get_trial_dir()) / "hf"
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_from = tempfile.mkdtemp(prefix="resume-")
        with checkpoint.as_directory() as d:
            shutil.copytree(d, resume_from, dirs_exist_ok=True)
        if (Path(resume_from) / SUMMARY).is_file():
            # The trial died after its policy was reported: nothing left to train.
            summary = json.loads((Path(resume_from) / SUMMARY).read_text())
            tune.report(summary, checkpoint=tune.Checkpoint.from_directory(resume_from))
            return
    metrics = train_dpo(
        setup.dpo,
        setup.model,
        setup.base_dir,
        setup.start_adapter_dir,
        setup.pairs_path,
        out_dir,
        setup.seed,
        callbacks=[TuneReport()],
        resume_from=resume_from,
        bad_rows=setup.bad_rows,
    )
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(out_dir / POLICY)))
