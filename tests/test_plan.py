"""The preflight plan (``python -m ray_jobs.pipeline CONFIG --plan``): right numbers, nothing run, one-line errors.

The tiny config runs in-process (its numbers checked against the stages' own functions); the study config runs
as the user runs it, a subprocess, on a LLaVA-1.5-shaped model with the real processor (576 image tokens,
Llama-2 tokenizer) and the real LRV-Chart rows, once passing and once with a ``dpo.max_length`` no prompt fits.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ray_jobs.pipeline import main
from ray_jobs.session import parse_args, parse_cli

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("1. data:", "2. token lengths", "3. SFT grid:", "4. generation")


def _run_main(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def test_help_lists_plan(capsys):
    assert _run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--plan" in out and "starts no Ray" in out


def test_parse_cli_takes_driver_options_among_overrides(tmp_path):
    config = str(REPO / "configs" / "tiny.yaml")
    cfg, store, args = parse_cli(
        "d",
        [config, "sft.lora_r=4", "--plan", f"run.root={tmp_path}"],
        options=lambda p: p.add_argument("--plan", action="store_true"),
    )
    assert args.plan and cfg.sft.lora_r == 4 and cfg.run.root == str(tmp_path)
    cfg, store = parse_args("d", [config, f"run.root={tmp_path}"])  # the old two-value form is unchanged
    assert store.root == str(tmp_path)
    assert not tmp_path.joinpath("sft").exists()


def test_tiny_plan(tiny_config, capsys):
    from vlm_posttrain.data import split_rows
    from vlm_posttrain.plan import build_plan
    from vlm_posttrain.sft import to_sft_dataset
    from vlm_posttrain.tiny import build_processor

    cfg = tiny_config(sft={"grid": {"lora_alpha": [16, 8], "epochs": [1, 2]}})
    ray_before = "ray" in sys.modules
    assert _run_main([cfg.source, "--plan"]) == 0
    out = capsys.readouterr().out
    for section in SECTIONS:
        assert section in out, out
    assert not Path(cfg.run.root).exists(), "the plan wrote under run.root"
    if not ray_before:
        assert "ray" not in sys.modules, "the plan imported ray"

    # Rows per split, as the data stage splits them.
    by_split, _, _ = split_rows(cfg.data, cfg.run.seed, "tiny")
    for split, rows in by_split.items():
        assert re.search(rf"^\s+{split}\s+{len(rows)}$", out, re.M), (split, out)
    # Steps: the SFT stage's own filter for the kept rows, then ceil(rows / (batch * accum)) * epochs.
    kept = len(
        to_sft_dataset(pd.DataFrame(by_split["train"]), build_processor(), cfg.sft.max_length, "skip")[0]
    )
    per_epoch = math.ceil(kept / (cfg.sft.batch_size * cfg.sft.grad_accum))
    lines = re.findall(r"^  trial (\d+): (.*?)  ~([\d.]+) GB  (\d+) steps", out, re.M)
    trials = cfg.sft.trials()
    assert len(lines) == len(trials) == 4
    for (_, values, _, steps), trial in zip(lines, trials, strict=True):
        assert values == " ".join(f"{k}={getattr(trial, k)}" for k in cfg.sft.grid)
        assert int(steps) == per_epoch * trial.epochs
    assert f"total: {per_epoch * 6} optimizer steps" in out
    # Generation work: pairs.limit prompts x k x new tokens; eval: test rows x (base + 4 trials + soup + dpo).
    p, e = cfg.pairs, cfg.eval
    prompts_n = min(p.limit, len(by_split["train"])) if p.limit else len(by_split["train"])  # 0: all
    assert f"{prompts_n} prompts x {p.k} samples x {p.max_new_tokens} new tokens" in out
    assert f"= {prompts_n * math.comb(p.k, 2) * 2:,} judge calls" in out
    answers = len(by_split["test"]) * 7
    assert f"{len(by_split['test'])} test rows x 7 variants" in out
    assert f"= {answers * e.max_new_tokens:,} tokens at most" in out

    plan = build_plan(cfg)
    assert plan.problems == ()
    assert plan.kept_train == kept
    assert list(plan.trials["steps"]) == [per_epoch * t.epochs for t in trials]
    assert list(plan.rows["rows"]) == [len(by_split[s]) for s in ("train", "val", "test")]
    assert plan.variants[0] == "base" and plan.variants[-1] == "dpo/round1" and len(plan.variants) == 7


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["sft.max_length=30"], ["error: sft.max_length=30: no train example fits", "raise sft.max_length"]),
        (
            ["resources.gpus_per_trial=0.5", "resources.gpu_memory_gb=1"],
            ["error: resources.gpus_per_trial=0.5 lets 2 trial(s) share one card", "GB usable"],
        ),
    ],
    ids=["sft-max-length", "grid-does-not-fit"],
)
def test_tiny_plan_refuses(tiny_config, capsys, overrides, expected):
    cfg = tiny_config()
    assert _run_main([cfg.source, "--plan", *overrides]) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    for part in expected:
        assert part in last, last
    assert "would fail:" in captured.out
    assert not Path(cfg.run.root).exists()


# ---- the study config on the real processor and the real rows ------------------------------------------


@pytest.fixture(scope="module")
def llava15_model(llama2_gguf, tmp_path_factory) -> Path:
    """One LLaVA-1.5-shaped model folder (the legacy pipeline) for this module, built once."""
    from vlm_posttrain.llava15 import build_llava15

    return build_llava15(tmp_path_factory.mktemp("plan-llava15") / "model", llama2_gguf, "legacy")


def _study(
    llava15_model: Path, shared_data: Path, root: Path, *extra: str
) -> tuple[subprocess.CompletedProcess, float]:
    # data.subset ("LRV Chart") names a hub config; the jsonl source reads the folder and ignores it.
    argv = [
        sys.executable,
        "-m",
        "ray_jobs.pipeline",
        "configs/study.yaml",
        "--plan",
        f"model.name={llava15_model}",
        "data.source=jsonl",
        f"data.path={shared_data / 'lrv_chart_train'}",
        f"run.root={root}",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    return out, time.perf_counter() - start


def test_study_plan(llava15_model, shared_data, tmp_path):
    from vlm_posttrain import modeling, prompts
    from vlm_posttrain.config import load_config
    from vlm_posttrain.data import decode_image, split_rows
    from vlm_posttrain.families import image_tokens
    from vlm_posttrain.sft import token_length

    out, seconds = _study(llava15_model, shared_data, tmp_path / "run")
    print(out.stdout)
    print(f"plan run: {seconds:.1f} s")
    assert out.returncode == 0, out.stderr
    assert "error:" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    for section in SECTIONS:
        assert section in out.stdout
    assert seconds < 60, f"the plan took {seconds:.1f} s"
    assert not (tmp_path / "run").exists()

    cfg = load_config(
        REPO / "configs" / "study.yaml",
        [f"model.name={llava15_model}", "data.source=jsonl", f"data.path={shared_data / 'lrv_chart_train'}"],
    )
    by_split, _, _ = split_rows(cfg.data, cfg.run.seed, "lrv")
    processor = modeling.load_processor(str(llava15_model))
    counts = {
        str(r["example_id"]): image_tokens(processor, decode_image(r["image"]))
        for split in ("train", "val")
        for r in by_split[split]
    }
    longest = max(
        token_length(processor, prompts.to_messages(list(r["conversations"])), [counts[str(r["example_id"])]])
        for split in ("train", "val")
        for r in by_split[split]
    )
    assert set(counts.values()) == {576} and 700 < longest < 800
    assert f"the longest example has {longest} tokens: fits sft.max_length=2048" in out.stdout
    assert "576 image tokens per image" in out.stdout
    assert len(re.findall(r"^  trial \d+: lora_alpha=\d+ lora_dropout=", out.stdout, re.M)) == 4
    assert "packing: gpus_per_trial 0.5: 2 trial(s) per 80 GB card fit" in out.stdout


def test_study_plan_dpo_max_length_too_short(llava15_model, shared_data, tmp_path):
    out, _ = _study(llava15_model, shared_data, tmp_path / "run", "dpo.max_length=512")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: dpo.max_length=512: "), lines[0]
    assert "raise dpo.max_length to at least" in lines[0]
    assert not (tmp_path / "run").exists()
    assert "building" not in out.stdout + out.stderr


# ---- every shipped study config, offline: the published checkpoint's config and image processor -----------

STUDIES = {
    "study.yaml": ("llava", {576}),
    "study-llava-1.5-13b.yaml": ("llava", {576}),
    "study-llava-onevision-7b.yaml": ("llava_onevision", None),
    "study-qwen2.5-vl-7b.yaml": ("qwen2_vl", None),
}


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_each_shipped_study_config_plans_offline_with_its_familys_image_tokens(name, shared_data):
    from vlm_posttrain import families
    from vlm_posttrain.config import load_config
    from vlm_posttrain.plan import build_plan, row_image_tokens

    family, fixed = STUDIES[name]
    cfg = load_config(
        REPO / "configs" / name, ["data.source=jsonl", f"data.path={shared_data / 'lrv_chart_train'}"]
    )
    assert cfg.model.family_name == family
    plan = build_plan(cfg)
    low, _, high = plan.image_tokens
    if fixed:
        assert {low, high} == fixed
    else:
        assert low < high  # anyres / dynamic resolution: the chart's size sets its token count
    assert not plan.problems, plan.problems
    assert plan.sft_too_long == 0, "the shipped config must fit every LRV chart whole"
    assert "fit" in plan.packing or "per 80 GB card" in plan.packing
    # The counts are the family's processor's: a chart of each extreme, through the stand-in processor.
    from vlm_posttrain.published import stand_in_processor

    processor = stand_in_processor(cfg.model.name)
    assert families.of_processor(processor).name == family
    from vlm_posttrain.data import split_rows

    rows = split_rows(cfg.data, cfg.run.seed, "lrv")[0]["train"][:20]
    assert set(row_image_tokens(processor, rows).values()) <= set(range(low, high + 1))


def test_onevision_at_llava_15s_max_length_would_skip_every_chart(shared_data):
    """anyres makes an LRV chart 2,819-8,686 tokens: LLaVA-1.5's 2048 fits none, and the plan says so."""
    from vlm_posttrain.config import load_config
    from vlm_posttrain.plan import build_plan

    cfg = load_config(
        REPO / "configs" / "study-llava-onevision-7b.yaml",
        ["data.source=jsonl", f"data.path={shared_data / 'lrv_chart_train'}", "sft.max_length=2048"],
    )
    plan = build_plan(cfg)
    (problem,) = [p for p in plan.problems if p.startswith("sft.max_length=2048: no train example fits")]
    assert problem.endswith(f"raise sft.max_length to at least {plan.sft_max}")  # the longest train example
    assert plan.kept_train == 0
