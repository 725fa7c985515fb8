"""The SFT stage: supervised tokens are exactly the answers, LoRA sits on the language model only, and the
grid runs as Ray Tune trials whose adapters all trained."""

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlm_posttrain import modeling
from vlm_posttrain.config import LORA_LANGUAGE_TARGET, ModelConfig, SftConfig
from vlm_posttrain.data import DataError, load_split
from vlm_posttrain.sft import to_sft_dataset

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is the value of Apples?"},
    {"from": "gpt", "value": "The value of Apples is 42."},
    {"from": "human", "value": "Which category is the lowest?"},
    {"from": "gpt", "value": "Kiwis"},
]


def _rows(conversations_list):
    from tests.test_data import _png

    return pd.DataFrame(
        [
            {
                "example_id": f"e{i}",
                "image": _png(),
                "conversations": c,
                "source": "t",
                "answer_type": "",
                "group": "",
            }
            for i, c in enumerate(conversations_list)
        ]
    )


def test_supervised_tokens_are_exactly_the_answers(tiny_model_dir):
    processor = modeling.load_processor(str(tiny_model_dir))
    ds, _ = to_sft_dataset(_rows([CONVERSATION, CONVERSATION[:2]]), processor, 512, "fail")
    batch = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)([ds[0], ds[1]])
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for row, answers in enumerate([["The value of Apples is 42.", "Kiwis"], ["The value of Apples is 42."]]):
        labels = batch["labels"][row]
        supervised = labels[labels != -100]
        assert tok.decode(supervised) == "".join(f" {a}</s>" for a in answers)
        assert image_id not in supervised.tolist()
        # The supervised positions are the answer spans and nothing of the prompt: labels equal inputs there.
        ids = batch["input_ids"][row]
        assert torch.equal(ids[labels != -100], supervised)
        prompt_text = tok.decode(ids[(labels == -100) & (batch["attention_mask"][row] == 1)])
        assert "USER:" in prompt_text and "ASSISTANT:" in prompt_text and "42" not in prompt_text
    assert batch["pixel_values"].shape[0] == 2


def test_dynamic_padding_pads_to_longest_in_batch(tiny_model_dir):
    processor = modeling.load_processor(str(tiny_model_dir))
    ds, _ = to_sft_dataset(_rows([CONVERSATION[:2], CONVERSATION[:2]]), processor, 512, "fail")
    batch = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)([ds[0], ds[1]])
    assert batch["attention_mask"].all()
    assert batch["input_ids"].shape[1] < 64


def test_too_long_examples_are_counted_or_fatal(tiny_model_dir):
    processor = modeling.load_processor(str(tiny_model_dir))
    long = [
        {"from": "human", "value": "<image>\n" + "what is the value " * 40},
        {"from": "gpt", "value": "1"},
    ]
    ds, rejects = to_sft_dataset(_rows([CONVERSATION[:2], long]), processor, 64, "skip")
    assert len(ds) == 1 and rejects.counts["too_long"] == 1
    with pytest.raises(DataError, match="exceed sft.max_length=64"):
        to_sft_dataset(_rows([long]), processor, 64, "fail")


def _lora(model_dir, r, alpha, dropout, seed=0, train_projector=False):
    base = modeling.load_base(str(model_dir), ModelConfig(name=str(model_dir)))
    sft = SftConfig(lora_r=r, lora_alpha=alpha, lora_dropout=dropout, train_projector=train_projector)
    cfg = modeling.lora_config(sft, LORA_LANGUAGE_TARGET)
    return modeling.attach_lora(base, cfg, seed)


def test_lora_only_on_language_model_and_same_rank_starts_identical(tiny_model_dir):
    a = _lora(tiny_model_dir, 8, 16, 0.05)
    b = _lora(tiny_model_dir, 8, 8, 0.10)
    names = [n for n, p in a.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n and "lora_" in n for n in names)
    assert not any("vision_tower" in n for n, _ in a.named_modules() if "lora_A" in n)
    a_init = {n: p for n, p in a.named_parameters() if "lora_A" in n}
    b_init = {n: p for n, p in b.named_parameters() if "lora_A" in n}
    assert all(torch.equal(a_init[n], b_init[n]) for n in a_init)
    projector = _lora(tiny_model_dir, 8, 16, 0.05, train_projector=True)
    assert any("multi_modal_projector" in n for n, p in projector.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_tune_grid_trains_every_lora_parameter(tiny_model_dir, tiny_data_dir, tiny_config, local_ray):

    from ray_jobs import sft as sft_job

    cfg = tiny_config(
        sft={"epochs": 1, "batch_size": 8, "logging_steps": 2, "grid": {"lora_alpha": [16, 8]}},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 2},
    )
    store = sft_job.RunStore(cfg.run.root)
    path = sft_job.run(cfg, store, str(tiny_model_dir), str(tiny_data_dir))
    table = pd.read_parquet(f"{path}/trials.parquet")
    assert len(table) == 2 and sorted(table["config/lora_alpha"]) == [8, 16]
    # Each trial trained as its own typed config (the section at its grid point): PEFT's saved LoRA config and
    # the adapter's provenance say so, and Tune ran exactly the points SftConfig.trials expands.
    trials = {t.lora_alpha: t for t in cfg.sft.trials()}
    for _, row in table.iterrows():
        trial = trials[row["config/lora_alpha"]]
        peft = json.loads(Path(path, row["adapter"], "adapter_config.json").read_text())
        assert (peft["r"], peft["lora_alpha"], peft["lora_dropout"]) == (
            trial.lora_r,
            trial.lora_alpha,
            trial.lora_dropout,
        )
        provenance = json.loads(Path(path, row["adapter"], "provenance.json").read_text())
        assert provenance["config"]["sft"] == dataclasses.asdict(trial)
        assert provenance["trial_id"] == row["trial_id"]
    init = {n: p.detach() for n, p in _lora(tiny_model_dir, 8, 16, 0.05).named_parameters() if "lora_" in n}
    for adapter in table["adapter"]:
        trained = load_file(f"{path}/{adapter}/adapter_model.safetensors")
        assert len(trained) == len(init)
        for name, tensor in trained.items():
            start = init[name.replace(".weight", ".default.weight")]
            assert not torch.allclose(tensor, start), f"{name} did not change"
    assert len(load_split(tiny_data_dir, "val")) > 0
    # Tune's TensorBoard logger wrote each trial's curves: `tensorboard --logdir <run root>/sft/_tune` shows them.
    experiment = Path(store.tune_experiment("sft", Path(path).name.removeprefix("sft-")))
    trial_dirs = [d for d in experiment.iterdir() if d.name.startswith("train_sft")]
    assert len(trial_dirs) == 2 and all(any(d.glob("events.out.tfevents.*")) for d in trial_dirs)
    # A second run finds the complete artifact and does not retrain.
    assert sft_job.run(cfg, store, str(tiny_model_dir), str(tiny_data_dir)) == path


def test_qlora_trial_trains_on_a_4bit_language_model(tiny_model_dir, tiny_data_dir, tmp_path):
    import bitsandbytes as bnb

    from vlm_posttrain.sft import train_trial

    cfg = ModelConfig(name=str(tiny_model_dir), load_in_4bit=True)
    quantized = [
        n
        for n, m in modeling.load_base(str(tiny_model_dir), cfg).named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    ]
    assert quantized and all(n.startswith("model.language_model.") for n in quantized)
    sft = SftConfig(
        learning_rate=1e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=8, logging_steps=2
    )
    metrics = train_trial(sft, cfg, tiny_model_dir, tiny_data_dir, tmp_path, 0)
    assert metrics["eval_loss"] > 0 and metrics["train_examples"] == len(load_split(tiny_data_dir, "train"))
    (checkpoint,) = tmp_path.glob("checkpoint-*")
    trained = load_file(checkpoint / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n)


@pytest.mark.slow
def test_an_input_problem_inside_a_trial_ends_the_run_in_one_line_without_a_retry(
    tiny_model_dir, tiny_data_dir, tiny_config, tmp_path, capsys, local_ray
):
    """No example fits sft.max_length: the trial's DataError is reported, not raised, so Tune (max_failures=2)
    retries nothing, and the driver ends with one line and exit 2."""

    from ray_jobs import sft as sft_job
    from ray_jobs.session import INPUT_ERROR, InputError, cli

    cfg = tiny_config(
        sft={"max_length": 8, "grid": {"lora_alpha": [16, 8]}},
        resources={"cpus_per_trial": 1, "max_failures": 2},
    )
    store = sft_job.RunStore(cfg.run.root)
    results = sft_job.make_tuner(cfg, store, "k", str(tiny_model_dir), str(tiny_data_dir)).fit()
    assert len(results) == 2 and all(r.error is None for r in results)  # nothing failed, nothing retried
    assert all(r.metrics[INPUT_ERROR].startswith("no example fits sft.max_length=8") for r in results)
    with pytest.raises(InputError, match="no example fits sft.max_length=8"):
        sft_job.raise_input_errors(results)
    capsys.readouterr()  # Ray's start-up lines
    with pytest.raises(SystemExit) as exit_info:
        cli(sft_job.collect_adapters)(cfg, results, tmp_path, {})
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == ["error: no example fits sft.max_length=8; raise it"]
