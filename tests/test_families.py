"""Each model family renders one example the same way through SFT, DPO, generation and self-judging.

For LLaVA-1.5, LLaVA-OneVision and Qwen2.5-VL (their tiny models: the real classes and processors, the
family's tokenizer shape): the training template gives the shipped template's bytes; SFT supervises the
answer and its end-of-turn token only, and those are the tokens DPO trains as the completion and the tokens
that follow the generation prompt; the BOS rule holds (one for LLaVA-1.5, none for the Qwen-based ones); an
image becomes as many tokens as the processor says for its size (variable for the two anyres families);
prepared batches of differently sized images answer as the processor's own batches do. An unknown
architecture fails at config load in one line.
"""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
import torch
from PIL import Image
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlm_posttrain import dpo, families, modeling, prompts
from vlm_posttrain.config import ConfigError, ModelConfig, load_config
from vlm_posttrain.generation import Generator, Sampling, encode_rows
from vlm_posttrain.pairs.judges import label_tokens
from vlm_posttrain.sft import to_sft_dataset, token_length
from vlm_posttrain.tiny import BUILDERS

SIZES = [(64, 64), (128, 64), (40, 90)]
QUESTION = "<image>\nWhat is the value of France in 2019?"
ANSWER = "The value of France is 12."
OTHER = "France is 7."


def png(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def conversation(answer: str = ANSWER) -> list[dict]:
    return [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_dir(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def processor(family_dir):
    return modeling.load_processor(str(family_dir[1]))


def test_family_is_read_from_the_checkpoint(family_dir, processor):
    name, folder = family_dir
    assert families.detect(str(folder)).name == name
    assert families.of_processor(processor).name == name
    assert ModelConfig(name=str(folder)).family_name == name


def test_training_template_renders_the_shipped_bytes(processor):
    family = families.of_processor(processor)
    messages = prompts.to_messages(conversation())
    for generation_prompt, turns in ((False, messages), (True, messages[:-1])):
        ours = prompts.render(processor, turns, add_generation_prompt=generation_prompt)
        shipped = processor.apply_chat_template(
            turns,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=family.shipped_template,
        )
        assert ours == shipped
    assert "{% generation %}" in family.chat_template.replace("{%-", "{%").replace("-%}", "%}")


def test_bos_rule(processor):
    tok = processor.tokenizer
    text = prompts.generation_prompt(processor, conversation())
    ids = encode_rows(processor, [Image.new("RGB", (64, 64))], [text])[0]["input_ids"].tolist()
    if tok.bos_token is None:  # Qwen2's tokenizer: no BOS at all
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    else:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def sft_batch(processor, answers: list[str], sizes: list[tuple[int, int]]):
    rows = [
        {"example_id": str(i), "image": png(size), "conversations": conversation(a)}
        for i, (a, size) in enumerate(zip(answers, sizes, strict=True))
    ]
    ds, _ = to_sft_dataset(pd.DataFrame(rows), processor, 4096, "fail")
    return DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(
        [ds[i] for i in range(len(ds))]
    )


def test_sft_supervises_the_answer_and_its_end_of_turn_only(processor):
    family, tok = families.of_processor(processor), processor.tokenizer
    batch = sft_batch(processor, [ANSWER, OTHER], SIZES[:2])
    prompt_text = prompts.generation_prompt(processor, conversation())
    for i, answer in enumerate([ANSWER, OTHER]):
        labels = batch["input_ids"][i][batch["labels"][i] != -100].tolist()
        completion = prompts.completion_text(
            processor, prompts.to_messages(conversation(answer))[:-1], answer
        )
        assert completion.strip(" ") == answer + family.answer_end
        assert labels == prompts.completion_ids(tok, prompt_text, completion)
        assert tok.decode(labels, skip_special_tokens=True).strip() == answer


def test_images_become_the_processors_token_count(processor):
    family = families.of_processor(processor)
    counts = [families.image_tokens(processor, Image.new("RGB", s)) for s in SIZES]
    assert counts == [families._expand_and_count(processor, s) for s in SIZES]
    if family.name != "llava":
        assert len(set(counts)) > 1, counts  # anyres / dynamic resolution: the size matters
    batch = sft_batch(processor, [ANSWER] * len(SIZES), SIZES)
    image_id = processor.tokenizer.convert_tokens_to_ids(family.image_token)
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == counts
    # The length every stage checks against max_length is the length built.
    for i, n in enumerate(counts):
        length = token_length(processor, prompts.to_messages(conversation()), [n])
        assert length == int(batch["attention_mask"][i].sum())


def test_dpo_completions_are_the_sft_tokens(processor):
    example = {
        "images": [Image.new("RGB", (128, 64), (200, 30, 30))],
        "prompt": prompts.preference_prompt(conversation()),
        "chosen": prompts.preference_completion(ANSWER),
        "rejected": prompts.preference_completion(OTHER),
    }
    batch = dpo.PreferenceCollator(processor)([example])
    sft = sft_batch(processor, [ANSWER, OTHER], [(128, 64)] * 2)
    prompt_text = prompts.generation_prompt(processor, conversation())
    prompt_ids = encode_rows(processor, example["images"], [prompt_text])[0]["input_ids"].tolist()
    for side in (0, 1):
        ids = batch["input_ids"][side]
        mask, completion = batch["attention_mask"][side] == 1, batch["completion_mask"][side] == 1
        assert ids[mask & ~completion].tolist() == prompt_ids
        assert ids[completion].tolist() == sft["input_ids"][side][sft["labels"][side] != -100].tolist()
        for key in families.TOKEN_TYPE_KEYS & batch.keys():  # per-token types stay aligned with the tokens
            assert batch[key].shape == batch["input_ids"].shape
            assert (batch[key][side][completion] == 0).all()
    n_images = [families.image_tokens(processor, example["images"][0])]
    _, n_prompt, n = dpo.pair_length(
        processor,
        dpo.structured(example["prompt"], 1),
        dpo.structured(example["chosen"], 0),
        dpo.structured(example["rejected"], 0),
        n_images,
    )
    assert n_prompt == len(prompt_ids) and n == int(batch["attention_mask"].sum(dim=1).max())


def test_self_judge_labels_follow_the_generation_prompt(processor):
    family = families.of_processor(processor)
    shared, (first, second) = label_tokens(processor, family.self_judge_labels)
    assert first != second
    messages = prompts.self_judge_messages("q?", "a", "b", family.self_judge_labels)
    text = prompts.self_judge_prompt(processor, "q?", "a", "b", family.self_judge_labels)
    without = prompts.render(processor, messages)
    assert text.startswith(without) and text[len(without) :]  # the family's own generation prompt follows
    # Each label answers as SFT would train it: the label's tokens after that prompt, then the end of turn.
    for label, token in zip(family.self_judge_labels, (first, second), strict=True):
        ids = prompts.completion_ids(
            processor.tokenizer, text, prompts.completion_text(processor, messages, label)
        )
        assert ids[: len(shared) + 1] == [*shared, token]


def test_prepared_batches_of_mixed_sizes_answer_as_the_processor_does(family_dir, processor):
    folder = family_dir[1]
    model = modeling.load_base(str(folder), ModelConfig(name=str(folder))).eval()
    gen = Generator(model, processor)
    images = [Image.new("RGB", s, (30 * i, 90, 160)) for i, s in enumerate(SIZES)]
    texts = [gen.prompt(conversation())] * len(images)
    sampling = Sampling(0.0, 1.0, 6)
    direct = gen.generate(images, texts, sampling=sampling)
    prepared = gen.generate_encoded(encode_rows(processor, images, texts), sampling=sampling)
    assert prepared.texts == direct.texts
    with torch.inference_mode():
        a = model(**gen.encode(images, texts)).logits
        b = model(**gen.collate(encode_rows(processor, images, texts))).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_architecture_fails_at_config_load(tmp_path):
    folder = tmp_path / "mllama"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mllama"}')
    cfg = tmp_path / "x.yaml"
    cfg.write_text(f"run: {{name: x}}\nmodel: {{name: {folder}}}\ndata: {{source: synthetic, limit: 4}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    message = str(err.value)
    assert "\n" not in message and "architecture 'mllama' is not supported" in message
    for model_type in ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"):
        assert model_type in message


def test_a_family_that_contradicts_the_checkpoint_fails_at_load(tmp_path, family_dir):
    name, folder = family_dir
    other = next(f for f in families.FAMILIES if f != name)
    cfg = tmp_path / "x.yaml"
    cfg.write_text(
        f"run: {{name: x}}\nmodel: {{name: {folder}, family: {other}}}\ndata: {{source: synthetic, limit: 4}}\n"
    )
    with pytest.raises(ConfigError, match=f"model.family: '{other}' but model"):
        load_config(cfg)


def test_4bit_quantizes_the_language_model_only(family_dir):
    import bitsandbytes as bnb

    folder = family_dir[1]
    model = modeling.load_base(str(folder), ModelConfig(name=str(folder), load_in_4bit=True))
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(n.startswith("model.language_model.") for n in quantized)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.lm_head.modules())


def test_lora_hits_the_language_model_and_train_projector_trains_the_familys_projector(family_dir):
    from vlm_posttrain.config import SftConfig

    folder = family_dir[1]
    cfg = ModelConfig(name=str(folder))
    family = families.detect(str(folder))
    sft = SftConfig(lora_r=4, lora_alpha=8, train_projector=True)
    model = modeling.attach_lora(
        modeling.load_base(str(folder), cfg), modeling.lora_config(sft, cfg.lora_target, family), 0
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    projector = [n for n in trainable if "lora_" not in n]
    assert lora and all(".language_model." in n for n in lora)
    assert projector and all(f".{family.projector}." in n for n in projector)
    assert not any(f".{family.vision_tower}." in n and family.projector not in n for n in trainable)


def test_a_qlora_trial_changes_every_adapter_matrix(family_dir, tmp_path):
    from safetensors.torch import load_file

    from vlm_posttrain.config import SftConfig
    from vlm_posttrain.sft import train_trial

    folder = family_dir[1]
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 8), ("val", 2)):
        rows = [
            {
                "example_id": f"{split}{i}",
                "image": png(SIZES[i % 3]),
                "conversations": conversation(f"{i} apples"),
            }
            for i in range(n)
        ]
        pd.DataFrame(rows).to_parquet(data / f"{split}.parquet")
    cfg = ModelConfig(name=str(folder), load_in_4bit=True)
    sft = SftConfig(
        learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=4, logging_steps=1
    )
    metrics = train_trial(sft, cfg, folder, data, tmp_path / "out", 0)
    assert metrics["train_examples"] == 8 and metrics["eval_loss"] > 0
    (checkpoint,) = (tmp_path / "out").glob("checkpoint-*")
    trained = load_file(checkpoint / "adapter_model.safetensors")
    lora_b = [t for n, t in trained.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: every one has moved


def test_self_judge_reads_each_familys_label_tokens_in_mixed_size_batches(family_dir, processor):
    from vlm_posttrain.pairs.judges import PairTask, SelfJudge

    folder = family_dir[1]
    model = modeling.load_base(str(folder), ModelConfig(name=str(folder))).eval()
    judge = SelfJudge(Generator(model, processor), tie_margin=0.0, batch_size=4)
    assert judge.labels == families.of_processor(processor).self_judge_labels
    tasks = [
        PairTask(Image.new("RGB", s, (40 * i, 80, 120)), "What is the value?", "12", "7", key=f"k{i}")
        for i, s in enumerate(SIZES)
    ]
    verdicts = judge.judge_pairs(tasks)
    # Each showing's margin is log p(label 1) - log p(label 2) read in a batch of mixed image sizes: the same
    # as each prompt scored alone.
    text = prompts.self_judge_prompt(processor, "What is the value?", "12", "7", judge.labels)
    alone = judge.label_logprobs([tasks[1].image], [text])[0]
    batch = judge.label_logprobs([t.image for t in tasks], [text] * len(tasks))[1]
    ids = [judge.label_ids[label] for label in judge.labels]
    torch.testing.assert_close(batch[ids], alone[ids], rtol=1e-4, atol=1e-4)
    for (
        verdict
    ) in verdicts:  # both orders shown, each with a read margin and the labels swapped with the order
        first, second = verdict.presentations
        assert first.a_first != second.a_first and not any(math.isnan(p.margin) for p in (first, second))
