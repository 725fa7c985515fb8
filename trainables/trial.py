"""What every Tune trial of the project shares: reporting the Trainer to Tune, and resuming from Tune's checkpoint.

callbacks=[TuneReport({"loss": "train_loss"})]   # Trainer logs -> tune.report, epoch checkpoints -> Tune
with resumed_checkpoint() as resume_from:        # None on a first start, a local copy after a restart
    trainer.train(resume_from_checkpoint=resume_from)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ray import tune
from transformers import TrainerCallback


class TuneReport(TrainerCallback):
    """Forwards the Trainer's training logs to Tune (``keys``: log key -> reported name, with the step and
    epoch) and each epoch's checkpoint as a Tune checkpoint, reported with the last evaluation's metrics."""

    def __init__(self, keys: dict[str, str]):
        self.keys, self.last_eval = keys, {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            reported = {name: float(logs[k]) for k, name in self.keys.items() if k in logs}
            tune.report(reported | {"step": state.global_step, "epoch": state.epoch})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_eval = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        metrics = {**self.last_eval, "step": state.global_step, "epoch": state.epoch}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt)))


@contextmanager
def resumed_checkpoint() -> Iterator[str | None]:
    """This trial's last Tune checkpoint as a local folder (None on a first start); the copy is read once and
    removed afterwards, so nothing stays outside the run root."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="resume-")
    try:
        with checkpoint.as_directory() as d:
            shutil.copytree(d, folder, dirs_exist_ok=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def trial_dir() -> Path:
    """Where this trial's Trainer writes (``checkpoint-*``, a finished policy): inside Tune's trial folder."""
    return Path(tune.get_context().get_trial_dir()) / "hf"
