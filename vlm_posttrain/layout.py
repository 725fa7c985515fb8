"""The run directory's layout: every stage's artifact folder and the name of every file in it, in one place.

    <run root>/<stage>/<stage>-<key>/<FILES[stage][name]>

Drivers, the core and ``analysis/`` read file names from here (``FILES["sft"]["trials"]``); the run store
(``vlm_posttrain.store``) builds the paths. Every adapter folder the project writes holds a PEFT adapter
(``ADAPTER_FILES``) and ``provenance.json``, which says what made it, so a folder copied out of the run still
describes itself.
"""

from __future__ import annotations

STAGES = ("model", "data", "sft", "soup", "pairs", "dpo", "eval", "report")
MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

FILES: dict[str, dict[str, str]] = {
    "model": {},  # a Hugging Face model folder (config, weights, processor)
    "data": {"train": "train.parquet", "val": "val.parquet", "test": "test.parquet"},
    # adapters/<trial_id>/: one PEFT folder per trial
    "sft": {"trials": "trials.parquet", "curves": "curves.parquet", "adapters": "adapters"},
    # trials: the SFT trial table plus the soup's row
    "soup": {"adapter": "adapter", "trials": "trials.parquet"},
    # best_of_k/: an SFT data folder (FILES["data"]) of each prompt's best answer
    "pairs": {
        "pairs": "pairs.parquet",
        "best_of_k": "best_of_k",
        "samples": "samples.parquet",
        "diagnostics": "diagnostics.parquet",
    },
    # adapter/: the whole policy (soup + DPO); curves: loss, rewards and log-probabilities per logging step
    "dpo": {"adapter": "adapter", "curves": "curves.parquet"},
    "eval": {"eval": "eval.parquet"},  # one row per (variant, system prompt, example, sample)
    "report": {"report": "report.md"},
}
