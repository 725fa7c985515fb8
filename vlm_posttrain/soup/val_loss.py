"""Validation loss of the base model plus one adapter folder, computed exactly as each SFT trial's ``eval_loss``.

Same val split, same example filter (``sft.max_length``, ``data.bad_rows``), same TRL collation with
``assistant_only_loss``, same eval batch size and loss reduction: the evaluation runs through
``SFTTrainer.evaluate`` with the SFT stage's own arguments, so a soup's number is comparable with every
trial's ``best_eval_loss`` (the loss of the checkpoint each trial kept). No training happens. The base is
loaded once; each call wraps it with the adapter and unwraps it afterwards.

    scorer = ValLoss(cfg, base_dir, data_dir)
    loss = scorer("runs/tiny/soup/soup-<key>/adapter")
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import PrinterCallback
from trl import SFTTrainer

from vlm_posttrain import modeling
from vlm_posttrain.config import ExperimentConfig
from vlm_posttrain.data import DataError, load_split
from vlm_posttrain.sft import to_sft_dataset, trainer_args


class ValLoss:
    """Callable: adapter folder -> mean validation loss of base + adapter (lower is better)."""

    def __init__(self, cfg: ExperimentConfig, base_dir: str | Path, data_dir: str | Path):
        # The SFT section's eval batch size and example filter, the data stage's bad-rows policy, the run's seed.
        model_cfg, sft_cfg, bad_rows = cfg.model, cfg.sft, cfg.data.bad_rows
        self.model_cfg, self.sft_cfg, self.seed = model_cfg, sft_cfg, cfg.run.seed
        self.processor = modeling.load_processor(str(base_dir), model_cfg.trust_remote_code)
        val = load_split(data_dir, "val")
        if not len(val):
            raise DataError(
                f"{data_dir}: the val split is empty, so adapters cannot be scored; set data.val_fraction > 0"
            )
        self.val, _ = to_sft_dataset(val, self.processor, sft_cfg.max_length, bad_rows)
        self.base = modeling.load_base(str(base_dir), model_cfg)

    def __call__(self, adapter_dir: str | Path) -> float:
        model = modeling.load_adapter(self.base, adapter_dir)
        try:
            with tempfile.TemporaryDirectory(prefix="val-loss-") as out:
                return float(self._trainer(model, Path(out)).evaluate()["eval_loss"])
        finally:
            # Take the adapter's layers out again, so the next call starts from the bare base.
            self.base = model.unload()

    def _trainer(self, model, out_dir: Path) -> SFTTrainer:
        args = trainer_args(self.sft_cfg, out_dir, self.seed, self.model_cfg.compute_dtype, True)
        # train_dataset is required by TRL and never used: nothing is trained here.
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=self.val,
            eval_dataset=self.val,
            processing_class=self.processor,
        )
        trainer.remove_callback(PrinterCallback)  # one printed metrics dict per call is noise here
        return trainer
