"""The Tune function trainable for one SFT grid point: a few lines around ``vlm_posttrain.sft.train_trial``.

Tune's ``config`` is the trial's grid point; ``SftConfig.at`` turns the section into that trial's typed
config once, and everything below reads that one object. Metrics go to Tune at every logging step; at every
epoch the Trainer's checkpoint (adapter, optimizer, scheduler, RNG state) becomes a Tune checkpoint scored by
``eval_loss``, so a restarted trial resumes exactly where its last epoch ended. Used by ``ray_jobs/sft.py``:

    tune.with_parameters(train_sft, setup=SftSetup(...))
"""

from __future__ import annotations

from dataclasses import dataclass

from ray import tune

from ray_jobs.session import stop_on_input_error
from trainables.trial import TuneReport, resumed_checkpoint, trial_dir
from vlm_posttrain.config import ModelConfig, SftConfig
from vlm_posttrain.sft import train_trial
from vlm_posttrain.store import local_copy


@dataclass(frozen=True)
class SftSetup:
    sft: SftConfig
    model: ModelConfig
    base_dir: str
    data_dir: str
    seed: int
    bad_rows: str


@stop_on_input_error
def train_sft(config: dict, setup: SftSetup) -> None:
    with resumed_checkpoint() as resume_from:
        metrics = train_trial(
            setup.sft.at(config),
            setup.model,
            local_copy(setup.base_dir),  # from the run root to this node, when that is a bucket
            local_copy(setup.data_dir),
            trial_dir(),
            setup.seed,
            bad_rows=setup.bad_rows,
            callbacks=[TuneReport({"loss": "train_loss"})],
            resume_from=resume_from,
        )
    tune.report(metrics)
