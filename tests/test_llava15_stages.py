"""Every stage once on the LLaVA-1.5-shaped fixture (the real processor: Llama-2 tokenizer, 576 image tokens,
336 px CLIP input) and real LRV-Chart rows, through the stage drivers ``ray_jobs.pipeline`` calls, with
``configs/study.yaml``'s settings (QLoRA in 4-bit NF4, r=16, the alpha grid, the self-judge) scaled down to
a few rows and steps: the code paths of a GPU run, nothing tiny-specific.

A randomly initialised policy has no view on which answer is better: its self-judge verdicts are label
preferences, which the both-orders protocol cancels, so its pairs stage keeps no pair (that outcome is
checked). DPO then runs on the policy's own samples as rejected and the reference answers as chosen."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from vlm_posttrain import prompts
from vlm_posttrain.config import load_config
from vlm_posttrain.data import load_split
from vlm_posttrain.store import RunStore, join

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def overrides(model_dir: Path, lrv: Path, root: Path) -> list[str]:
    """configs/study.yaml on 2 CPUs: a few rows and steps, float32 compute, no GPU shares."""
    return [
        f"run.root={root}",
        f"model.name={model_dir}",
        "model.compute_dtype=float32",
        "data.source=jsonl",
        f"data.path={lrv}",
        'data.subset=""',
        "data.limit=40",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "sft.batch_size=2",
        "sft.grad_accum=1",
        "sft.logging_steps=1",
        "sft.grid={lora_alpha: [16, 8]}",
        "soup.num_cpus=1",
        "soup.num_gpus=0",
        "pairs.limit=4",
        "pairs.max_new_tokens=8",
        "pairs.batch_size=4",
        "pairs.num_cpus=1",
        "pairs.num_gpus=0",
        "dpo.batch_size=2",
        "dpo.grad_accum=1",
        "dpo.logging_steps=1",
        "eval.judges=[reference]",
        "eval.max_new_tokens=8",
        "eval.batch_size=16",
        "eval.num_cpus=1",
        "eval.num_gpus=0",
        "resources.cpus_per_trial=1",
        "resources.gpus_per_trial=0",
        "resources.max_failures=0",
    ]


def pairs_from_samples(pairs_dir: str, data_dir: str, out: Path) -> Path:
    """Preference rows: the reference answer chosen, the policy's first sample rejected."""
    from vlm_posttrain.pairs.stage import write_preferences

    samples = pd.read_parquet(Path(pairs_dir) / "samples.parquet")
    first = samples.sort_values("sample").groupby("example_id").first()
    train = load_split(data_dir, "train").set_index("example_id").loc[first.index]
    rows = []
    for example_id, row in train.iterrows():
        conversations = list(row["conversations"])
        answer = prompts.final_answer(conversations)
        rejected = first.loc[example_id, "answer"] or "No."
        rows.append(
            {
                "images": [row["image"]],
                "prompt": prompts.preference_prompt(conversations),
                "chosen": prompts.preference_completion(answer),
                "rejected": prompts.preference_completion(rejected),
                "example_id": example_id,
                "judge": "reference-answer",
                "verdicts": [],
                "chosen_score": 1.0,
                "rejected_score": 0.0,
                "chosen_len": len(answer),
                "rejected_len": len(rejected),
                "chosen_sample": -1,  # the reference, not a sample
                "rejected_sample": 0,
            }
        )
    out.mkdir(parents=True)
    write_preferences(pd.DataFrame(rows), out / "pairs.parquet")
    return out / "pairs.parquet"


@pytest.fixture(scope="module")
def run(llava15_legacy_dir, shared_data, tmp_path_factory, local_ray):

    from ray_jobs import data as data_job
    from ray_jobs import dpo as dpo_job
    from ray_jobs import eval as eval_job
    from ray_jobs import model as model_job
    from ray_jobs import pairs as pairs_job
    from ray_jobs import report as report_job
    from ray_jobs import sft as sft_job
    from ray_jobs import soup as soup_job

    root = tmp_path_factory.mktemp("llava15-run")
    cfg = load_config(
        REPO / "configs" / "study.yaml",
        overrides(llava15_legacy_dir, shared_data / "lrv_chart_train", root / "run"),
    )
    store = RunStore(cfg.run.root)
    out = {"cfg": cfg, "base": model_job.run(cfg, store)}
    out["data"] = data_job.run(cfg, store)
    out["sft"] = sft_job.run(cfg, store, out["base"], out["data"])
    out["soup"] = soup_job.run(cfg, store, out["base"], out["data"], out["sft"])
    policy = join(out["soup"], soup_job.ADAPTER)
    out["pairs"] = pairs_job.run(cfg, store, out["base"], out["data"], policy)
    pairs = pairs_from_samples(out["pairs"], out["data"], root / "pairs-from-samples")
    out["dpo"] = dpo_job.run(cfg, store, out["base"], policy, str(pairs), 1)
    variants = eval_job.variants_of(cfg, out["sft"], out["soup"], [out["dpo"]])
    out["eval"] = eval_job.run(cfg, store, out["base"], out["data"], variants)
    out["report"] = report_job.run(cfg, store)
    return out


def manifest(path: str) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def test_sft_trials_train_qlora_adapters_on_every_example(run):
    from safetensors.torch import load_file

    assert run["cfg"].model.load_in_4bit  # study.yaml's QLoRA path, on bitsandbytes' CPU kernels
    trials = pd.read_parquet(Path(run["sft"]) / "trials.parquet")
    assert len(trials) == 2 and trials["eval_loss"].map(math.isfinite).all()
    assert (trials["train_examples"] == len(load_split(run["data"], "train"))).all()  # 2048 holds every row
    assert (trials["skipped_too_long"] == 0).all()
    for adapter in trials["adapter"]:
        weights = load_file(Path(run["sft"]) / adapter / "adapter_model.safetensors")
        b = [w for name, w in weights.items() if "lora_B" in name]
        assert len(b) == 2 * 7 and all(w.abs().sum() > 0 for w in b)  # 2 layers x 7 projections, all moved


def test_soup_is_exact_and_scored(run):
    metrics = manifest(run["soup"])["metrics"]
    assert metrics["ingredients"] == 2 and metrics["r"] == 32 and metrics["self_check_passed"]
    assert metrics["self_check_max_rel_error"] < 1e-5
    table = pd.read_parquet(Path(run["soup"]) / "trials.parquet")
    assert len(table) == 3 and table["eval_loss"].map(math.isfinite).all()


def test_pairs_sample_k_answers_per_prompt_and_judge_each_in_both_orders(run):
    samples = pd.read_parquet(Path(run["pairs"]) / "samples.parquet")
    assert samples["example_id"].nunique() == 4 and samples.groupby("example_id").size().eq(2).all()
    assert (samples["answer_tokens"] > 0).all() and samples["seed"].nunique() == 8
    metrics = manifest(run["pairs"])["metrics"]
    diagnostics = metrics["diagnostics"]
    assert metrics["prompts"] == 4 and metrics["pairs"] + diagnostics["ties"]["k"] == 4
    assert diagnostics["unparsed"]["n"] == 8  # one pair per prompt, shown in both orders


def test_dpo_starts_at_ln2_on_every_pair(run):
    metrics = manifest(run["dpo"])["metrics"]
    assert abs(metrics["first_loss"] - math.log(2)) < 1e-2 and metrics["train_pairs"] == 4
    assert metrics["steps"] == 2 and len(pd.read_parquet(Path(run["dpo"]) / "curves.parquet")) == 2


def test_eval_answers_every_variant_and_the_report_is_written(run):
    table = pd.read_parquet(Path(run["eval"]) / "eval.parquet")
    variants = set(table["variant"])
    assert {"base", "dpo/round1"} <= variants and sum(v.startswith("sft/") for v in variants) == 2
    assert sum(v.startswith("soup/") for v in variants) == 1
    assert len(table) == len(variants) * len(load_split(run["data"], "test"))
    assert (table["answer_tokens"] > 0).all() and table["reference/score"].notna().all()
    assert (Path(run["report"]) / "report.md").read_text().count("dpo/round1") >= 1
