"""The Tune function trainable for one SFT grid point: a few lines around ``vlm_posttrain.sft.train_trial``.

Metrics go to Tune at every logging step; at every epoch the Trainer's checkpoint (adapter, optimizer,
scheduler, RNG state) becomes a Tune checkpoint scored by ``eval_loss``, so a restarted trial resumes
exactly where its last epoch ended. Used by ``ray_jobs/sft.py``:

    tune.with_parameters(train_sft, setup=SftSetup(...))
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from transformers import TrainerCallback

from ray_jobs.session import stop_on_input_error
from vlm_posttrain.config import ModelConfig, SftConfig
from vlm_posttrain.sft import train_trial


@dataclass(frozen=True)
class SftSetup:
    sft: SftConfig
    model: ModelConfig
    base_dir: str
    data_dir: str
    seed: int
    bad_rows: str


class TuneReport(TrainerCallback):
    """Forwards the Trainer's logs to Tune and each epoch's checkpoint as a Tune checkpoint."""

    def __init__(self):
        self.last_eval: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            tune.report({"train_loss": float(logs["loss"]), "step": state.global_step, "epoch": state.epoch})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_eval = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        metrics = {**self.last_eval, "step": state.global_step, "epoch": state.epoch}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt)))


@stop_on_input_error
def train_sft(config: dict, setup: SftSetup) -> None:
    out_dir = Path(tune.get_context().get_trial_dir()) / "hf"
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_from = tempfile.mkdtemp(prefix="resume-")
        with checkpoint.as_directory() as d:
            shutil.copytree(d, resume_from, dirs_exist_ok=True)
    try:
        metrics = train_trial(
            config,
            setup.sft,
            setup.model,
            setup.base_dir,
            setup.data_dir,
            out_dir,
            setup.seed,
            bad_rows=setup.bad_rows,
            callbacks=[TuneReport()],
            resume_from=resume_from,
        )
    finally:
        if resume_from:  # the restored checkpoint's copy is read once; keep nothing outside the run root
            shutil.rmtree(resume_from, ignore_errors=True)
    tune.report(metrics)
