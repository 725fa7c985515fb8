"""The pairs stage: seeded batched generation, the judges and their both-orders / label-swap protocol, critic
verdict parsing, bias diagnostics, and a run on the tiny model whose pairs go straight into TRL's DPO collator
and whose best-of-K rows are SFT data."""

import json
import math

import datasets
import pandas as pd
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlm_posttrain import dpo, prompts
from vlm_posttrain.config import ConfigError, ModelConfig, PairsConfig, SftConfig
from vlm_posttrain.data import decode_image, load_split
from vlm_posttrain.generation import Generator, Sampling, SeededGumbelSampler
from vlm_posttrain.pairs.judges import (
    FIRST,
    SECOND,
    TIE,
    UNPARSED,
    CriticJudge,
    PairTask,
    PairwiseJudge,
    Presentation,
    ReferenceJudge,
    SelfJudge,
    best_and_worst,
    parse_verdict,
    tournament,
)
from vlm_posttrain.pairs.stage import (
    BEST_OF_K,
    DIAGNOSTICS,
    PAIRS,
    diagnostics,
    judge_samples,
    run_local,
    wilson,
    write_outputs,
)
from vlm_posttrain.sft import to_sft_dataset
from vlm_posttrain.tiny import build_tiny_critic


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return Generator.load(tiny_model_dir, ModelConfig(name=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def train(tiny_data_dir):
    return load_split(tiny_data_dir, "train")


def _task(key="ex:0:1", a="The value is 12.", b="It is 40.", reference="12"):
    from PIL import Image

    return PairTask(Image.new("RGB", (32, 32)), "What is the value?", a, b, reference, "", key)


# ---- prompts: generation is the SFT rendering, byte for byte and token for token --------------------------


def test_generation_prompt_is_the_sft_rendering_up_to_the_answer(policy, train):
    collator = DataCollatorForVisionLanguageModeling(policy.processor)
    for row in train.head(4).itertuples():
        conversations = list(row.conversations)
        messages = prompts.to_messages(conversations)
        sft_text = prompts.render(policy.processor, messages)
        gen_text = policy.prompt(conversations)
        answer = prompts.final_answer(conversations)
        assert sft_text == gen_text + " " + answer + prompts.EOS
        image = decode_image(row.image)
        sft_ids = collator([{"images": [image], "messages": messages}])["input_ids"][0].tolist()
        gen_ids = policy.encode([image], [gen_text])["input_ids"][0].tolist()
        assert sft_ids[: len(gen_ids)] == gen_ids


def test_preference_prompt_renders_as_the_generation_prompt(policy, train):
    conversations = list(train.iloc[0].conversations)
    collator = dpo.PreferenceCollator(policy.processor)
    image = decode_image(train.iloc[0].image)
    example = {
        "images": [image],
        "prompt": prompts.preference_prompt(conversations),
        "chosen": prompts.preference_completion("a"),
        "rejected": prompts.preference_completion("b"),
    }
    batch = collator([example])
    prompt_ids = batch["input_ids"][0][batch["completion_mask"][0] == 0].tolist()
    assert prompt_ids == policy.encode([image], [policy.prompt(conversations)])["input_ids"][0].tolist()


# ---- generation -------------------------------------------------------------------------------------------


def test_sampling_depends_on_the_row_seed_not_the_batch(policy, train):
    rows = train.head(3)
    images = [decode_image(b) for b in rows.image]
    texts = [policy.prompt(list(c)) for c in rows.conversations]
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6)
    together = policy.generate(images, texts, k=2, sampling=sampling, seeds=[5, 6, 7])
    alone = policy.generate(images[1:2], texts[1:2], k=2, sampling=sampling, seeds=[6])
    assert alone.texts[0] == together.texts[1]
    assert len(together.texts) == 3 and all(len(s) == 2 for s in together.texts)
    assert together.generated_tokens == sum(map(sum, together.tokens)) > 0


def test_gumbel_sampler_samples_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    picks = SeededGumbelSampler(range(4000), 0.8, 1.0, torch.device("cpu"))(None, logits).argmax(-1)
    freq = torch.bincount(picks, minlength=4) / 4000
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.8, -1), atol=0.03)
    top = SeededGumbelSampler(range(500), 1.0, 0.5, torch.device("cpu"))(None, logits[:500]).argmax(-1)
    assert set(top.tolist()) == {0}  # top-p 0.5 keeps only the most likely token here


# ---- the protocol --------------------------------------------------------------------------------------------


class PositionStub(PairwiseJudge):
    """Always prefers whatever is shown first."""

    def decide(self, shown):
        return [Presentation(p.a_first, p.labels, FIRST) for _, p in shown]


class LabelStub(PairwiseJudge):
    """Always prefers the answer labelled "X", wherever it is shown."""

    labels = prompts.SELF_JUDGE_LABELS
    counterbalance_labels = True

    def decide(self, shown):
        return [Presentation(p.a_first, p.labels, FIRST if p.labels[0] == "X" else SECOND) for _, p in shown]


class StudyLabelStub(LabelStub):
    """The study's protocol: the order swaps but each answer keeps its label (answer a is always "X")."""

    def presentations(self, task):
        return Presentation(True, ("X", "Y")), Presentation(False, ("Y", "X"))


def test_both_orders_turn_a_position_preference_into_ties():
    verdicts = PositionStub().judge_pairs([_task(f"ex:{i}:{i + 1}") for i in range(6)])
    assert {v.winner for v in verdicts} == {TIE}
    judged = _judged_frame(verdicts)
    table = diagnostics(judged).set_index("metric")
    assert table.loc["order_flip", "rate"] == 1.0 and table.loc["first_position_win", "rate"] == 1.0
    assert table.loc["kept", "k"] == 0 and table.loc["pair_ties", "rate"] == 1.0


def test_label_swap_cancels_a_label_preference():
    tasks = [_task(f"ex:{i}:{i + 1}") for i in range(8)]
    assert {v.winner for v in LabelStub().judge_pairs(tasks)} == {TIE}
    # With labels that stay with the answers, the same judge "prefers" answer a every time.
    assert {v.winner for v in StudyLabelStub().judge_pairs(tasks)} == {"a"}
    # Counterbalanced label order: position and label effects are measured apart.
    table = diagnostics(_judged_frame(LabelStub().judge_pairs(tasks))).set_index("metric")
    assert table.loc["label_X_win", "rate"] == 1.0
    assert 0.0 < table.loc["first_position_win", "rate"] < 1.0


def _judged_frame(verdicts) -> pd.DataFrame:
    """One judged prompt per verdict (k = 2), as judge_samples writes it."""
    rows = []
    for n, v in enumerate(verdicts):
        scores = tournament(2, {(0, 1): v.winner})
        best, worst = best_and_worst(scores) or (-1, -1)
        comparisons = json.dumps([{"i": 0, "j": 1, **v.to_dict()}])
        rows.append(
            {
                "example_id": f"ex{n}",
                "comparisons": comparisons,
                "scores": scores,
                "best": best,
                "worst": worst,
                "sample_tokens": [5, 9],
            }
        )
    return pd.DataFrame(rows)


def test_self_judge_reads_label_token_probabilities(policy):
    judge = SelfJudge(policy, tie_margin=0.0, batch_size=4)
    verdicts = judge.judge_pairs([_task(f"ex:{i}:{i + 1}") for i in range(3)])
    for v in verdicts:
        assert v.winner in ("a", "b", TIE)
        for p in v.presentations:
            assert math.isfinite(p.margin) and p.verdict in (FIRST, SECOND) and "logp" in p.raw
            assert set(p.labels) == {"X", "Y"}

    # A model that puts more weight on the token of "X": every showing names X's answer, every pair ties.
    def prefers_x(images, texts):
        logp = torch.full((len(texts), len(policy.tokenizer)), -5.0)
        logp[:, judge.label_ids["X"]] = -1.0
        return logp

    judge.label_logprobs = prefers_x
    verdicts = judge.judge_pairs([_task(f"ex:{i}:{i + 1}") for i in range(4)])
    assert {v.winner for v in verdicts} == {TIE}
    assert all(p.winning_label == "X" for v in verdicts for p in v.presentations)


def test_reference_judge_prefers_the_reference_and_is_order_free():
    (verdict,) = ReferenceJudge().judge_pairs([_task(a="It is 40.", b="The value is 12.", reference="12")])
    assert verdict.winner == "b" and [p.verdict for p in verdict.presentations] == [SECOND, FIRST]


def test_tournament_scores_wins_minus_losses():
    winners = {(0, 1): "a", (0, 2): "a", (1, 2): TIE}
    assert tournament(3, winners) == [2, -1, -1]
    assert best_and_worst([2, -1, -1]) == (0, 1)
    assert best_and_worst([0, 0, 0]) is None
    assert tournament(3, {(0, 1): UNPARSED, (0, 2): "b", (1, 2): "b"}) == [-1, -1, 2]


def test_wilson_interval():
    lo, hi = wilson(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-3) and hi == pytest.approx(0.8749, abs=1e-3)
    assert all(math.isnan(x) for x in wilson(0, 0))


# ---- critic verdicts -------------------------------------------------------------------------------------------

REALISTIC = [
    ("The first response is better because it reads the value 12 directly from the chart.", FIRST),
    ("Overall, the second response is better.", SECOND),
    ("Both responses are equally accurate and helpful.", TIE),
    ("The second response is more accurate and detailed than the first response.", SECOND),
    ("The first response is better than the second response.", FIRST),
    ("Response 2 is better. It names the correct year.", SECOND),
    ("I would prefer the first response.", FIRST),
    ("The second response is worse than the first one: it invents a value.", FIRST),
    (
        "The first response is more detailed, but it misreads the axis. The second response is better. "
        "Overall, the second response is better.",
        SECOND,
    ),
    (
        "Both responses are equally accurate. However, the second response is better because it is concise.",
        SECOND,
    ),
    ("Neither the first response nor the second response is better; both miss the trend.", TIE),
    ("The better answer is the second one.", SECOND),
    ("The first response provides a more accurate description of the chart.", FIRST),
    ("No, the second response is better", SECOND),
    ("**Second**", SECOND),
]
GARBAGE = [
    "",
    None,
    "asdf qwer zxcv",
    "The chart shows a bar for each year.",
    "first second",
    "better",
    "1 2 3",
    "The first response is better. The second response is better.",
    "It is not true that the first response is better.",
    "The first response is not better than the second.",
    "ꖄ�/�ndoebr mplain servee�d",
]


@pytest.mark.parametrize(("text", "expected"), REALISTIC)
def test_parse_verdict_realistic(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text", GARBAGE)
def test_parse_verdict_garbage_is_unparsed(text):
    assert parse_verdict(text) == UNPARSED


def test_parse_verdict_reproduces_the_studys_kept_labels(shared_data):
    """The study's own outputs ("response X", prompt echoes): its kept label follows from our parse."""
    df = pd.read_csv(shared_data / "seed_outputs" / "preferred_response.csv")

    def kept(row):
        first = parse_verdict(row.Xfirst_response, ("X", "Y"))
        second = parse_verdict(row.Yfirst_response, ("X", "Y"))
        return (
            {FIRST: "response1", SECOND: "response2"}.get(first, "neither") if first == second else "neither"
        )

    assert (df.apply(kept, axis=1) == df["response"]).all()
    assert df.Xfirst_response.map(lambda t: parse_verdict(t, ("X", "Y"))).value_counts()[UNPARSED] == 3


def test_diagnostics_of_the_studys_self_critique(shared_data):
    """The study's verdicts through our diagnostics: a strong first-position bias and a "Y" label bias."""
    from vlm_posttrain.pairs.judges import PairVerdict, combine

    verdicts = []
    for row in pd.read_csv(shared_data / "seed_outputs" / "preferred_response.csv").itertuples():
        # Answer a (response1) was always labelled X, b always Y; the order swapped between the two asks.
        shown = (
            Presentation(True, ("X", "Y"), parse_verdict(row.Xfirst_response, ("X", "Y"))),
            Presentation(False, ("Y", "X"), parse_verdict(row.Yfirst_response, ("Y", "X"))),
        )
        verdicts.append(PairVerdict(combine(shown), shown))
    table = diagnostics(_judged_frame(verdicts)).set_index("metric")
    assert (table.loc["kept", "k"], table.loc["order_flip", "k"], table.loc["order_flip", "n"]) == (
        612,
        385,
        997,
    )
    assert table.loc["first_position_win", "k"] == 1218 and table.loc["first_position_win", "ci_low"] > 0.5
    assert table.loc["label_X_win", "k"] == 867 and table.loc["label_X_win", "ci_high"] < 0.5


def test_critic_judge_on_a_tiny_llava_onevision(tmp_path):
    critic = str(build_tiny_critic(tmp_path / "critic"))
    judge = CriticJudge.load(
        PairsConfig(judge="critic", critic_model=critic, critic_max_new_tokens=6, batch_size=4)
    )
    text = prompts.critic_prompt(judge.critic.processor, "What is the value?", "12", "40")
    assert (
        prompts.CRITIC_PAIRWISE_PROMPT.format(question="What is the value?", first="12", second="40") in text
    )
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
    )
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    verdicts = judge.judge_pairs([_task("ex:0:1"), _task("ex:1:2", a="12", b="")])
    for v in verdicts:
        assert [p.a_first for p in v.presentations] == [True, False]
        assert all(p.labels == prompts.CRITIC_LABELS for p in v.presentations)
        # A random critic writes noise: it must be unparsed, never read as a verdict.
        assert all(p.verdict == parse_verdict(p.raw) for p in v.presentations)
        assert v.winner in ("a", "b", TIE, UNPARSED)


# ---- a whole run on the tiny model -------------------------------------------------------------------------


class ShorterAnswerJudge(PairwiseJudge):
    """A consistent stand-in judge (the shorter text wins), so a run on a random model keeps pairs."""

    name = "shorter"

    def decide(self, shown):
        out = []
        for task, p in shown:
            first, second = (task.answer_a, task.answer_b) if p.a_first else (task.answer_b, task.answer_a)
            verdict = FIRST if len(first) < len(second) else SECOND if len(second) < len(first) else TIE
            out.append(Presentation(p.a_first, p.labels, verdict))
        return out


def test_run_on_the_tiny_model_writes_pairs_for_dpo_and_sft(policy, train, tiny_data_dir, tmp_path):
    cfg = PairsConfig(k=3, limit=6, max_new_tokens=8, batch_size=4, temperature=1.0)
    judged = run_local(policy, ShorterAnswerJudge(), train, cfg, seed=0)
    assert len(judged) == 6 and all(len(s) == 3 for s in judged["samples"])
    metrics = write_outputs(judged, "shorter", tiny_data_dir, tmp_path)
    json.dumps(metrics)  # the manifest's metrics are plain JSON
    assert metrics["pairs"] == metrics["best_of_k"] > 0 and metrics["generated_tokens"] > 0

    ds = datasets.Dataset.from_parquet(str(tmp_path / PAIRS))
    assert {
        "images",
        "prompt",
        "chosen",
        "rejected",
        "example_id",
        "judge",
        "verdicts",
        "chosen_score",
        "rejected_score",
        "chosen_len",
        "rejected_len",
    } <= set(ds.column_names)
    row = ds[0]
    assert row["chosen_score"] > row["rejected_score"]
    assert len(row["chosen"][0]["content"]) <= len(row["rejected"][0]["content"])
    batch = dpo.PreferenceCollator(policy.processor)([dict(ds[i]) for i in range(len(ds))])
    assert batch["input_ids"].shape[0] == 2 * len(ds) and "pixel_values" in batch
    chosen_ids = batch["input_ids"][0][batch["completion_mask"][0] == 1]
    assert policy.tokenizer.decode(chosen_ids) == prompts.completion_text(
        policy.processor, row["prompt"], row["chosen"][0]["content"]
    )

    best = load_split(tmp_path / BEST_OF_K, "train")
    assert list(best.columns) == list(load_split(tiny_data_dir, "train").columns)
    sft_rows, _ = to_sft_dataset(best, policy.processor, 512, "fail")
    assert len(sft_rows) == len(best) == len(ds)
    assert load_split(tmp_path / BEST_OF_K, "val").equals(load_split(tiny_data_dir, "val"))

    table = pd.read_parquet(tmp_path / DIAGNOSTICS).set_index("metric")
    assert table.loc["kept", "k"] == len(ds) and table.loc["kept", "n"] == 6
    assert table.loc["order_flip", "k"] == 0  # a consistent judge never flips


def test_self_judge_batch_on_generated_samples(policy, train):
    cfg = PairsConfig(k=2, max_new_tokens=4)
    from vlm_posttrain.pairs.stage import generate_samples

    judged = judge_samples(SelfJudge(policy, 0.0, 8), generate_samples(policy, train.head(2), cfg, seed=1))
    assert list(judged["best"]) != [] and all(len(s) == 2 for s in judged["scores"])
    assert all(len(json.loads(c)[0]["presentations"]) == 2 for c in judged["comparisons"])


def test_pairs_config_is_checked(tiny_config):
    assert tiny_config().pairs.judge == "reference"
    with pytest.raises(ConfigError, match="pairs.critic_model"):
        tiny_config(pairs={"judge": "critic"})
    with pytest.raises(ConfigError, match="pairs.temperature"):
        tiny_config(pairs={"temperature": 0.0})
    with pytest.raises(ConfigError, match="pairs.k"):
        tiny_config(pairs={"k": 1})
    keyed = tiny_config().keyed("pairs")
    assert "actors" not in keyed and "k" in keyed


@pytest.mark.slow
def test_ray_data_stage_publishes_pairs(tiny_config, tiny_model_dir, tiny_data_dir, tmp_path, local_ray):
    """The driver on actor pools (generator, then self judge), published with its diagnostics; a rerun skips."""

    from ray_jobs import pairs as pairs_job
    from vlm_posttrain import modeling

    base = modeling.load_base(str(tiny_model_dir), ModelConfig(name=str(tiny_model_dir)))
    lora = modeling.lora_config(
        SftConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0), ModelConfig("x").lora_target
    )
    modeling.attach_lora(base, lora, seed=0).save_pretrained(str(tmp_path / "adapter"))
    cfg = tiny_config(
        pairs={"limit": 4, "k": 2, "batch_size": 2, "max_new_tokens": 4, "num_cpus": 1, "tie_margin": 0.0}
    )
    store = pairs_job.RunStore(cfg.run.root)
    args = (cfg, store, str(tiny_model_dir), str(tiny_data_dir), str(tmp_path / "adapter"))
    path = pairs_job.run(*args)
    manifest = json.loads(
        (tmp_path / "run" / "pairs" / path.rsplit("/", 1)[-1] / "manifest.json").read_text()
    )
    assert manifest["metrics"]["prompts"] == 4 and manifest["inputs"]["policy"].endswith("adapter")
    assert set(manifest["metrics"]["diagnostics"]) >= {
        "kept",
        "order_flip",
        "first_position_win",
        "label_X_win",
    }
    samples = pd.read_parquet(f"{path}/samples.parquet")
    assert len(samples) == 8 and samples["seed"].nunique() == 8
    assert pd.read_parquet(f"{path}/{PAIRS}").shape[0] == manifest["metrics"]["pairs"]
    assert pairs_job.run(*args) == path  # complete: skipped without Ray


def test_the_stage_warns_when_few_prompts_keep_a_pair(capsys):
    from ray_jobs.pairs import warn_few_pairs

    warn_few_pairs({"prompts": 32, "pairs": 8}, 0.25)
    assert capsys.readouterr().err == ""  # 25% is not below 25%
    warn_few_pairs({"prompts": 32, "pairs": 3}, 0.25)
    err = capsys.readouterr().err
    assert err.startswith(
        "[pairs] WARNING: 3 of 32 prompts kept a pair (9%, below pairs.warn_kept_below=0.25)"
    )
    warn_few_pairs({"prompts": 32, "pairs": 0}, 0.0)
    assert capsys.readouterr().err == ""  # 0 turns the warning off
