"""LLaVA-1.5's real tokenizer and processor, rebuilt offline from the Llama-2 vocabulary (``vlm_posttrain.llava15``),
on real LRV-Chart rows: the documented ids, exactly one BOS at the start of every sequence each stage builds, SFT
labels = each answer's tokens + EOS, DPO completions = the SFT tokens = what generation emits, single-token
self-judge labels, batched greedy generation = one at a time. Every test runs under both tokenizer pipelines that
reproduce the documented ids (``legacy`` and ``metaspace``); all skip where ../shared is absent."""

import pandas as pd
import pytest
from PIL import Image
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlm_posttrain import dpo, modeling, prompts
from vlm_posttrain.config import ModelConfig
from vlm_posttrain.data import decode_image, load_split
from vlm_posttrain.generation import Generator, Sampling, encode_rows
from vlm_posttrain.llava15 import IMAGE_SEQ_LENGTH, IMAGE_TOKEN_ID, PAD_TOKEN_ID
from vlm_posttrain.pairs.judges import SelfJudge, label_tokens
from vlm_posttrain.sft import to_sft_dataset

BOS, EOS, SPACE = 1, 2, 29871  # SPACE: the lone "▁" a completion tokenized on its own starts with (legacy)
# vLLM's LLaVA code documents these ids for llava-hf/llava-1.5-7b-hf (before <image> is expanded).
DOC_PROMPT = "USER: <image>\nWhat's the content of the image?\nASSISTANT:"
DOC_IDS = [
    1,
    3148,
    1001,
    29901,
    29871,
    32000,
    29871,
    13,
    5618,
    29915,
    29879,
    278,
    2793,
    310,
    278,
    1967,
    29973,
    13,
]
DOC_IDS += [22933, 9047, 13566, 29901]
# The form of llava-hf's own chat template: it writes no BOS (llava-hf's processor call adds it).
HUB_STYLE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for p in message['content'] if p['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for p in message['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}"
    "{% if message['role'] == 'user' %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def expanded(ids: list[int]) -> list[int]:
    return [t for i in ids for t in ([i] * IMAGE_SEQ_LENGTH if i == IMAGE_TOKEN_ID else [i])]


def one_bos(ids) -> bool:
    ids = list(ids)
    return ids[0] == BOS and ids.count(BOS) == 1


def unpadded(batch, i: int) -> list[int]:
    return batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()


@pytest.fixture(scope="module")
def processor(llava15_dir):
    return modeling.load_processor(str(llava15_dir))


@pytest.fixture(scope="module")
def rows(lrv_data_dir):
    return load_split(lrv_data_dir, "train").head(4).to_dict("records")


@pytest.fixture(scope="module")
def policy(llava15_dir, processor):
    model = modeling.load_base(str(llava15_dir), ModelConfig(name=str(llava15_dir))).eval()
    return Generator(model, processor)


def sft_batch(processor, conversations_list):
    df_rows = [
        {"example_id": str(i), "image": r[0], "conversations": r[1]} for i, r in enumerate(conversations_list)
    ]
    ds, _ = to_sft_dataset(pd.DataFrame(df_rows), processor, 4096, "fail")
    collate = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    return collate([ds[i] for i in range(len(ds))])


def supervised(batch, i: int) -> list[int]:
    return batch["input_ids"][i][batch["labels"][i] != -100].tolist()


def pair_example(row, rejected: str) -> dict:
    conversations = list(row["conversations"])
    return {
        "images": [decode_image(row["image"])],
        "prompt": prompts.preference_prompt(conversations),
        "chosen": prompts.preference_completion(prompts.final_answer(conversations)),
        "rejected": prompts.preference_completion(rejected),
    }


def test_processor_is_llava_hf_s(processor):
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_TOKEN_ID, PAD_TOKEN_ID]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (
        BOS,
        EOS,
        PAD_TOKEN_ID,
        "left",
    )
    from vlm_posttrain.families import image_tokens

    assert {image_tokens(processor, Image.new("RGB", s)) for s in [(640, 480), (200, 900), (336, 336)]} == {
        576
    }
    pixels = processor(text=[DOC_PROMPT], images=[Image.new("RGB", (900, 500))], return_tensors="pt")[
        "pixel_values"
    ]
    assert tuple(pixels.shape) == (1, 3, 336, 336)


def test_the_documented_prompt_gives_the_documented_ids(processor):
    tok = processor.tokenizer
    assert tok(DOC_PROMPT)["input_ids"] == DOC_IDS  # llava-hf's usage: the tokenizer adds the BOS
    # This project's policy: the text carries the BOS, the tokenizer adds nothing.
    assert tok(tok.bos_token + DOC_PROMPT, add_special_tokens=False)["input_ids"] == DOC_IDS
    (row,) = encode_rows(processor, [Image.new("RGB", (640, 480))], [tok.bos_token + DOC_PROMPT])
    assert row["input_ids"].tolist() == expanded(DOC_IDS)


def test_rendered_prompts_tokenize_as_llava_hf_s_own_usage(processor, rows):
    tok = processor.tokenizer
    for row in rows:
        text = prompts.generation_prompt(processor, list(row["conversations"]))
        assert text.startswith("<s>USER: <image>\n") and text.endswith(" ASSISTANT:")
        ours = tok(text, add_special_tokens=False)["input_ids"]
        assert ours == tok(text.removeprefix("<s>"))["input_ids"] and one_bos(ours)


def test_every_sequence_each_stage_builds_starts_with_one_bos(processor, policy, rows):
    images = [decode_image(r["image"]) for r in rows]
    convs = [list(r["conversations"]) for r in rows]
    sft = sft_batch(processor, [(r["image"], c) for r, c in zip(rows, convs, strict=True)])
    assert all(one_bos(unpadded(sft, i)) for i in range(len(rows)))
    examples = [pair_example(r, "No.") for r in rows]
    pairs = dpo.PreferenceCollator(processor)(examples)
    assert all(one_bos(unpadded(pairs, i)) for i in range(2 * len(rows)))
    gen_texts = [policy.prompt(c) for c in convs]
    assert all(one_bos(r["input_ids"]) for r in encode_rows(processor, images, gen_texts))
    batch = policy.encode(images, gen_texts)
    assert all(one_bos(unpadded(batch, i)) for i in range(len(rows)))
    judge_texts = [
        prompts.self_judge_prompt(processor, prompts.final_question(c), "a", "b", ("X", "Y")) for c in convs
    ]
    judged = policy.encode(images, judge_texts)
    assert all(one_bos(unpadded(judged, i)) for i in range(len(rows)))
    # A critic whose template is Llama's: ours writes the BOS; llava-hf's form writes none and gets one.
    for template in (processor.chat_template, HUB_STYLE_TEMPLATE):
        processor.chat_template = template
        try:
            for text in (
                prompts.critic_prompt(processor, "q?", "a", "b"),
                prompts.critic_pointwise_prompt(processor, "q?", "a"),
            ):
                assert one_bos(processor.tokenizer(text, add_special_tokens=False)["input_ids"]), text
        finally:
            processor.chat_template = prompts.LLAVA_15_TEMPLATE


def test_sft_supervises_each_answer_and_its_eos_only(processor, rows):
    tok = processor.tokenizer
    convs = [list(r["conversations"]) for r in rows]
    batch = sft_batch(processor, [(r["image"], c) for r, c in zip(rows, convs, strict=True)])
    for i, conversations in enumerate(convs):
        answer = prompts.final_answer(conversations)
        labels = supervised(batch, i)
        assert labels[-1] == EOS and tok.decode(labels[:-1]) == answer
        assert labels[0] != SPACE  # the answer's first word, not a lone "▁"
        # The supervised tokens are what follows the generation prompt in one tokenization.
        prompt_text = prompts.generation_prompt(processor, conversations)
        assert labels == prompts.completion_ids(tok, prompt_text, f" {answer}{prompts.EOS}")
        # Everything before them is the generation prompt's tokens, the 576 image tokens included.
        prompt_ids = encode_rows(processor, [decode_image(rows[i]["image"])], [prompt_text])[0]["input_ids"]
        assert unpadded(batch, i)[: len(prompt_ids)] == prompt_ids.tolist()
        assert len(unpadded(batch, i)) == len(prompt_ids) + len(labels)


def test_dpo_trains_the_sft_tokens_after_the_generation_prompt(processor, rows):
    tok = processor.tokenizer
    rejected = prompts.final_answer(list(rows[1]["conversations"]))
    example = pair_example(rows[0], rejected)
    batch = dpo.PreferenceCollator(processor)([example])
    conversations = list(rows[0]["conversations"])
    sft = sft_batch(
        processor,
        [
            (rows[0]["image"], conversations),
            (rows[0]["image"], prompts.with_final_answer(conversations, rejected)),
        ],
    )
    prompt_ids = encode_rows(
        processor, [decode_image(rows[0]["image"])], [prompts.generation_prompt(processor, conversations)]
    )
    for side in (0, 1):  # chosen row, rejected row
        ids = batch["input_ids"][side]
        mask, completion = batch["attention_mask"][side] == 1, batch["completion_mask"][side] == 1
        assert ids[mask & ~completion].tolist() == prompt_ids[0]["input_ids"].tolist()
        assert ids[completion].tolist() == supervised(sft, side)
    # The lengths checked against dpo.max_length are the ones built.
    _, n_prompt, n = dpo.pair_length(
        processor,
        dpo.structured(example["prompt"], 1),
        dpo.structured(example["chosen"], 0),
        dpo.structured(example["rejected"], 0),
        [576],
    )
    assert n_prompt == len(prompt_ids[0]["input_ids"]) and n == int(batch["attention_mask"].sum(dim=1).max())
    # TRL 1.16's own collator tokenizes the completion apart: under the legacy normalizer one token too many.
    trl = DataCollatorForVisionPreference(processor)([pair_example(rows[0], rejected)])
    trl_chosen = trl["input_ids"][0][trl["completion_mask"][0] == 1].tolist()
    chosen_text = f" {prompts.final_answer(conversations)}{prompts.EOS}"
    alone = tok(chosen_text, add_special_tokens=False)["input_ids"]
    assert trl_chosen == alone
    if alone[0] == SPACE:  # the legacy pipeline
        assert trl_chosen == [SPACE, *supervised(sft, 0)]
    assert tok.decode(ids[completion][:-1]) == rejected


def test_self_judge_labels_are_single_tokens_after_the_prompt(processor, policy):
    shared, ids = label_tokens(processor, prompts.SELF_JUDGE_LABELS)
    assert shared == [] and processor.tokenizer.convert_ids_to_tokens(list(ids)) == ["▁X", "▁Y"]
    judge = SelfJudge(policy, tie_margin=0.1, batch_size=8)
    assert judge.label_ids == {"X": ids[0], "Y": ids[1]}


def test_batched_greedy_generation_equals_one_at_a_time(policy, rows):
    images = [decode_image(r["image"]) for r in rows[:3]]
    texts = [policy.prompt(list(r["conversations"])) for r in rows[:3]]
    assert len({len(policy.tokenizer(t)["input_ids"]) for t in texts}) > 1  # padding really happens
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    batched = policy.generate(images, texts, sampling=greedy)
    alone = [policy.generate([im], [t], sampling=greedy) for im, t in zip(images, texts, strict=True)]
    assert batched.texts == [a.texts[0] for a in alone]
    assert batched.tokens == [a.tokens[0] for a in alone]


def test_with_bos_leaves_a_tokenizer_without_the_convention_alone(processor):
    from vlm_posttrain.tiny import build_tokenizer

    tiny = build_tokenizer()
    assert prompts.with_bos(tiny, "<|im_start|>user") == "<|im_start|>user"
    assert prompts.with_bos(processor.tokenizer, "USER:") == "<s>USER:"
    assert prompts.with_bos(processor.tokenizer, "<s>USER:") == "<s>USER:"
