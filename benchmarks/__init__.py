"""Benchmarks: one command each, printing a small table and writing JSON (machine, versions, medians).

    python -m benchmarks.sft          # SFT tokens/s, dynamic padding vs padding to max length
    python -m benchmarks.grid         # a 4-trial grid under Ray Tune vs the same trainings in one process
    python -m benchmarks.pipeline     # the embedded default end to end: wall time and peak memory
    python -m benchmarks.generation   # batched generation vs a one-prompt-at-a-time loop
    python -m benchmarks.gpu          # LLaVA-7B-shaped LoRA/QLoRA/generation on CUDA (skips elsewhere)

Baseline and candidate are measured side by side in one process or one run, alternated, so machine noise
hits both; the ratio is the number to read, never an absolute time.
"""
