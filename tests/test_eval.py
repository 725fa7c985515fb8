"""The eval stage: critic scores read as the critic states them, the expected-score mode on a tiny
LLaVA-OneVision critic, adapters switched per variant, mixed-variant batches, and a Ray Data run writing the long table."""

import math

import pandas as pd
import pytest
import torch

from vlm_posttrain.data import decode_image, load_split
from vlm_posttrain.eval import CriticScorer, parse_critic_score
from vlm_posttrain.reference import reference_scores

CRITIC_OUTPUTS = [
    # (critic text, score it states on 0-100)
    ("The response correctly reads 42 from the 2019 bar. Overall, I would give it a score of 85.", 85.0),
    ("Score: 70\nThe answer mentions 3 categories but misses the trend in 2015-2020.", 70.0),
    ("The LMM response says 12.5% while the chart shows 25%. I would rate the response 4 out of 10.", 40.0),
    ("Rating: 7.5/10 - accurate but verbose.", 75.0),
    ("The chart has 5 bars and the largest is 40. The response is accurate. Score: 90/100", 90.0),
    ("First it says 10, then 20. My final score is 55.", 55.0),
    ("I would score this answer 30 out of 100 because the value 2018 is wrong.", 30.0),
]


@pytest.mark.parametrize("text, score", CRITIC_OUTPUTS)
def test_parse_critic_score_reads_the_stated_score(text, score):
    assert parse_critic_score(text) == pytest.approx(score)


@pytest.mark.parametrize(
    "text", ["", None, "The answer mentions 42 and 2019 but gives no verdict.", "Score: 250", "lorem ipsum"]
)
def test_unstated_or_impossible_scores_are_missing_not_zero(text):
    assert math.isnan(parse_critic_score(text))


def test_reference_scores_fill_a_column_per_row():
    rows = pd.DataFrame(
        {
            "answer": ["42", "The value is 43.", "No", "Apples"],
            "reference": ["42", "42", "Yes", "apples"],
            "answer_type": ["numeric", "numeric", "yes_no", "short_text"],
        }
    )
    scored = reference_scores(rows)
    assert list(scored["reference/score"]) == [100.0, 100.0, 0.0, 100.0]


def test_expected_mode_on_a_tiny_onevision_critic_is_always_in_range(tmp_path, tiny_data_dir):
    from vlm_posttrain.modeling import load_critic
    from vlm_posttrain.tiny import build_tiny_critic

    scorer = CriticScorer(
        *load_critic(str(build_tiny_critic(tmp_path / "critic"))),
        mode="expected",
        max_new_tokens=256,
        step=25,
    )
    test = load_split(tiny_data_dir, "train").head(3)
    images = [decode_image(b) for b in test["image"]]
    scores, raws = scorer.score(images, ["What is shown?"] * 3, ["A bar chart.", "42", ""])
    assert all(0.0 <= s <= 100.0 for s in scores) and len(raws) == 3
    for raw in raws:
        probs = [float(part.split(":")[1]) for part in raw.split()]
        assert [int(part.split(":")[0]) for part in raw.split()] == [0, 25, 50, 75, 100]
        assert sum(probs) == pytest.approx(1.0, abs=0.01)
    generated, replies = CriticScorer(
        scorer.critic.model, scorer.critic.processor, "generate", max_new_tokens=4
    ).score(images, ["What is shown?"] * 3, ["A bar chart.", "42", ""])
    # A random critic states no score: missing, never zero.
    assert len(replies) == 3 and all(math.isnan(s) or 0 <= s <= 100 for s in generated)


def test_variants_switch_adapters_without_reloading(tiny_model_dir, tiny_data_dir, tmp_path):
    from vlm_posttrain import modeling
    from vlm_posttrain.config import ModelConfig
    from vlm_posttrain.eval import Variant, VariantAnswerer
    from vlm_posttrain.tiny import build_tiny_adapter

    build_tiny_adapter(tiny_model_dir, tmp_path / "adapter", std=0.5)
    answerer = VariantAnswerer(
        tiny_model_dir,
        ModelConfig(name=str(tiny_model_dir)),
        [Variant("base"), Variant("a", str(tmp_path / "adapter"))],
    )
    gen = answerer.generator
    test = load_split(tiny_data_dir, "train").head(2)
    inputs = gen.encode(
        [decode_image(b) for b in test["image"]], [gen.prompt(list(c)) for c in test["conversations"]]
    )
    logits = {}
    for name in ("base", "a", "base"):
        with answerer.active(name), torch.no_grad():
            logits.setdefault(name, []).append(gen.model(**inputs).logits)
    reference = modeling.load_base(str(tiny_model_dir), ModelConfig(name=str(tiny_model_dir)))
    with torch.no_grad():
        plain = reference(**inputs).logits
    assert torch.allclose(logits["base"][0], plain, atol=1e-5) and torch.allclose(
        logits["base"][1], plain, atol=1e-5
    )
    assert not torch.allclose(logits["a"][0], plain, atol=1e-3)


def test_a_mixed_batch_answers_as_each_variant_alone(tiny_model_dir, tiny_data_dir, tmp_path):
    """One generate call over rows of several variants gives each row its own variant's greedy answer."""
    from vlm_posttrain.config import ModelConfig
    from vlm_posttrain.eval import Variant, VariantAnswerer
    from vlm_posttrain.generation import Sampling
    from vlm_posttrain.tiny import build_tiny_adapter

    cfg = ModelConfig(name=str(tiny_model_dir))
    for seed, name in ((1, "a"), (2, "b")):
        build_tiny_adapter(tiny_model_dir, tmp_path / name, seed=seed, std=0.5)
    variants = [Variant("base"), Variant("a", str(tmp_path / "a")), Variant("b", str(tmp_path / "b"))]
    answerer = VariantAnswerer(tiny_model_dir, cfg, variants)
    test = load_split(tiny_data_dir, "train").head(3)
    tasks = pd.concat([test.assign(variant=v.name, system_prompt="") for v in variants], ignore_index=True)
    tasks = tasks.sample(frac=1.0, random_state=0, ignore_index=True)  # variants interleaved in the batch
    sampling = Sampling(max_new_tokens=8)
    calls = []
    generate = answerer.generator.generate_encoded
    answerer.generator.generate_encoded = lambda *a, **kw: calls.append(len(a[0])) or generate(*a, **kw)
    mixed = pd.DataFrame(answerer.answer_rows(tasks, sampling, samples=1, seed=0))
    assert calls == [len(tasks)]  # the whole batch in one generate call
    alone = pd.concat(
        [
            pd.DataFrame(answerer.answer_rows(tasks[tasks["variant"] == v.name], sampling, samples=1, seed=0))
            for v in variants
        ]
    )
    key = ["variant", "example_id"]
    mixed, alone = (t.sort_values(key, ignore_index=True) for t in (mixed, alone))
    assert mixed[key + ["answer", "answer_tokens"]].equals(alone[key + ["answer", "answer_tokens"]])
    answers = mixed.pivot(index="example_id", columns="variant", values="answer")
    assert (answers["a"] != answers["base"]).any() and (answers["b"] != answers["a"]).any()


def test_prepared_prompts_generate_what_the_processor_batch_does(tiny_model_dir, tiny_data_dir):
    """Rows through the processor one by one (a Ray Data task's work), padded by the actor, give the same
    batch and the same answers as one padded processor call."""
    from vlm_posttrain.config import ModelConfig
    from vlm_posttrain.eval import encoded_columns, prepare_tasks
    from vlm_posttrain.generation import Generator, Sampling

    gen = Generator.load(tiny_model_dir, ModelConfig(name=str(tiny_model_dir)))
    rows = load_split(tiny_data_dir, "train").head(5)
    tasks = rows.assign(system_prompt=["", "Be brief.", "", "", "Answer with one word."], variant="base")
    prepared = prepare_tasks(gen.processor, tasks)
    assert list(prepared.columns) == [*tasks.columns, "input_ids", "pixel_values"]
    assert encoded_columns(prepared) == ["input_ids", "pixel_values"]
    images = [decode_image(b) for b in tasks["image"]]
    texts = [
        gen.prompt(list(c), p) for c, p in zip(tasks["conversations"], tasks["system_prompt"], strict=True)
    ]
    batch, collated = (
        gen.encode(images, texts),
        gen.collate(prepared[encoded_columns(prepared)].to_dict("records")),
    )
    assert batch["input_ids"].shape[1] > min(
        len(i) for i in prepared["input_ids"]
    )  # prompts of several lengths
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(batch[key], collated[key]), key
    sampling = Sampling(max_new_tokens=8)
    direct = gen.generate(images, texts, sampling=sampling)
    encoded = gen.generate_encoded(prepared[encoded_columns(prepared)].to_dict("records"), sampling=sampling)
    assert direct.texts == encoded.texts and direct.tokens == encoded.tokens


@pytest.mark.slow
def test_ray_data_eval_writes_one_row_per_variant_and_example(
    tiny_model_dir, tiny_data_dir, tiny_config, tmp_path, local_ray
):

    from ray_jobs import eval as eval_job
    from vlm_posttrain.eval import Variant
    from vlm_posttrain.store import RunStore

    cfg = tiny_config(
        eval={"limit": 4, "max_new_tokens": 6, "batch_size": 4, "system_prompts": ["", "Be brief."]}
    )
    adapter = _write_adapter(tiny_model_dir, tmp_path / "adapter")
    variants = [Variant("base"), Variant("sft/x", str(adapter))]
    path = eval_job.run(cfg, RunStore(cfg.run.root), str(tiny_model_dir), str(tiny_data_dir), variants)
    table = pd.read_parquet(f"{path}/{eval_job.TABLE}")
    n_test = min(4, len(load_split(tiny_data_dir, "test")))
    assert len(table) == 2 * 2 * n_test
    assert not table.duplicated(["variant", "system_prompt", "example_id", "sample"]).any()
    assert set(table["variant"]) == {"base", "sft/x"} and table["reference/score"].between(0, 100).all()
    for col in ("question", "reference", "answer", "answer_tokens", "latency_s", "reference/raw"):
        assert col in table


def _write_adapter(model_dir, out):
    from peft import get_peft_model

    from vlm_posttrain import modeling
    from vlm_posttrain.config import LORA_LANGUAGE_TARGET, ModelConfig, SftConfig

    base = modeling.load_base(str(model_dir), ModelConfig(name=str(model_dir)))
    lora = modeling.lora_config(SftConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0), LORA_LANGUAGE_TARGET)
    peft = get_peft_model(base, lora)
    peft.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "kinds, expected",
    [
        (
            ["base", "sft", "soup", "dpo"],
            ["base", "sft/t1", "sft/t2", "soup/delta_mean", "dpo/round1", "dpo/round2"],
        ),
        (["dpo", "base"], ["base", "dpo/round1", "dpo/round2"]),
        (["soup"], ["soup/delta_mean"]),
    ],
)
def test_eval_variants_are_the_ones_the_config_lists(tiny_config, tmp_path, kinds, expected):
    """``eval.variants`` picks the kinds; each variant's adapter is the artifact's own adapter folder."""
    from ray_jobs import eval as eval_job

    sft, soup = tmp_path / "sft" / "sft-a", tmp_path / "soup" / "soup-b"
    sft.mkdir(parents=True)
    trials = pd.DataFrame({"trial_id": ["t1", "t2"], "adapter": ["adapters/t1", "adapters/t2"]})
    trials.to_parquet(sft / "trials.parquet")
    dpo = [str(tmp_path / "dpo" / f"dpo-{r}") for r in ("c", "d")]
    variants = eval_job.variants_of(tiny_config(eval={"variants": kinds}), str(sft), str(soup), dpo)
    assert [v.name for v in variants] == expected
    adapters = {v.name: v.adapter for v in variants}
    assert adapters.get("sft/t2", str(sft / "adapters/t2")) == str(sft / "adapters/t2")
    assert adapters.get("dpo/round2", f"{dpo[1]}/adapter") == f"{dpo[1]}/adapter"
    assert adapters.get("soup/delta_mean", str(soup / "adapter")) == str(soup / "adapter")
    assert adapters.get("base") is None
