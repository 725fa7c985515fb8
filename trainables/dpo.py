"""The Tune function trainable for one DPO run: a few lines around ``vlm_posttrain.dpo.train_dpo``.

Loss, rewards (chosen, rejected, margins, accuracies) and log-probabilities go to Tune at every logging
step; every epoch's Trainer checkpoint (both adapters, optimizer, scheduler, RNG state) becomes a Tune
checkpoint, so a restarted trial resumes where its last epoch ended. The finished policy folder
(``adapter/``, ``curves.parquet``, ``summary.json``) is the trial's last checkpoint. Used by
``ray_jobs/dpo.py``:

    tune.with_parameters(train_dpo_trial, setup=DpoSetup(...))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from ray_jobs.session import stop_on_input_error
from trainables.trial import TuneReport, resumed_checkpoint, trial_dir
from vlm_posttrain.config import DpoConfig, ModelConfig
from vlm_posttrain.dpo import CURVE_KEYS, POLICY, SUMMARY, train_dpo
from vlm_posttrain.store import local_copy


@dataclass(frozen=True)
class DpoSetup:
    dpo: DpoConfig
    model: ModelConfig
    base_dir: str
    start_adapter_dir: str
    pairs_path: str
    seed: int
    bad_rows: str = "fail"


@stop_on_input_error
def train_dpo_trial(config: dict, setup: DpoSetup) -> None:
    out_dir = trial_dir()
    with resumed_checkpoint() as resume_from:
        if resume_from and (Path(resume_from) / SUMMARY).is_file():
            # The trial died after its policy was reported: nothing left to train.
            summary = json.loads((Path(resume_from) / SUMMARY).read_text())
            tune.report(summary, checkpoint=tune.Checkpoint.from_directory(resume_from))
            return
        metrics = train_dpo(
            setup.dpo,
            setup.model,
            # From the run root to this node, when that is a bucket.
            local_copy(setup.base_dir),
            local_copy(setup.start_adapter_dir),
            local_copy(setup.pairs_path),
            out_dir,
            setup.seed,
            callbacks=[TuneReport({k: k for k in CURVE_KEYS if k not in ("step", "epoch")})],
            resume_from=resume_from,
            bad_rows=setup.bad_rows,
        )
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(out_dir / POLICY)))
