"""The DPO stage: pairs load straight into TRL's vision collator with every image token, prompts are the SFT
bytes, the reference is the starting (soup) policy so the first loss is ln 2, and the saved adapter is the
whole policy, loadable alone."""

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from trl.data_utils import apply_chat_template
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
from trl.trainer.utils import use_adapter

from vlm_posttrain import dpo, modeling, prompts
from vlm_posttrain.config import DpoConfig, ModelConfig
from vlm_posttrain.data import DataError, load_split
from vlm_posttrain.sft import to_sft_dataset
from vlm_posttrain.tiny import build_tiny_adapter

IMAGE_TOKENS = 16  # the tiny LLaVA: (32 px / patch 8)^2


def _start_adapter(model_dir, out, seed=1):
    """A LoRA adapter with non-zero B (a stand-in for the soup): its policy differs from the base."""
    return build_tiny_adapter(model_dir, out, seed=seed)


def _pairs_frame(data_dir, n=8, strings=False):
    """Preference rows as the pairs stage writes them, built from the train split (rejected: another answer).

    ``strings``: role/content-string messages and raw image bytes (the pairs stage's form; TRL places the
    image); otherwise list contents with an explicit image part and ``{bytes, path}`` images."""
    rows = load_split(data_dir, "train").head(n).to_dict("records")
    out = []
    for i, row in enumerate(rows):
        prompt, chosen = prompts.split_prompt(prompts.to_messages(list(row["conversations"])))
        other = rows[(i + 1) % len(rows)]["conversations"][-1]["value"] + " maybe"
        rejected = [{"role": "assistant", "content": [{"type": "text", "text": other}]}]
        images = [{"bytes": row["image"], "path": None}]
        if strings:
            prompt, chosen, rejected = (
                [{"role": m["role"], "content": m["content"][-1]["text"]} for m in turn]
                for turn in (prompt, chosen, rejected)
            )
            images = [row["image"]]
        out.append(
            {
                "example_id": row["example_id"],
                "images": images,
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "judge": "test",
                "verdicts": ["1>2", "2<1"],
                "chosen_score": 1.0,
                "rejected_score": 0.0,
                "chosen_len": len(chosen[0]["content"]),
                "rejected_len": len(other),
            }
        )
    return pd.DataFrame(out)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    pairs = root / "pairs" / dpo.PAIRS_FILE
    pairs.parent.mkdir()
    _pairs_frame(tiny_data_dir).to_parquet(pairs, index=False)
    return {"pairs": pairs, "start": _start_adapter(tiny_model_dir, root / "soup" / "adapter")}


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return modeling.load_processor(str(tiny_model_dir))


def test_pairs_parquet_loads_into_trl_collator_with_every_image_token(setup, processor):
    ds = dpo.to_dpo_dataset(dpo.load_pairs(setup["pairs"].parent), processor, 512)
    batch = dpo.PreferenceCollator(processor)([ds[0], ds[1], ds[2]])
    image_id = processor.tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
    assert batch["pixel_values"].shape[0] == 6  # one image per chosen row and per rejected row
    is_image = batch["input_ids"] == image_id
    assert (is_image.sum(dim=1) == IMAGE_TOKENS).all()
    assert not (is_image & (batch["completion_mask"] == 1)).any()
    # The lengths checked against max_length are the lengths the collator builds.
    for i, example in enumerate(ds.select(range(3))):
        _, n_prompt, n = dpo.pair_length(
            processor, example["prompt"], example["chosen"], example["rejected"], [IMAGE_TOKENS]
        )
        lengths = batch["attention_mask"][[i, i + 3]].sum(dim=1)
        assert (
            lengths.max() == n
            and (batch["attention_mask"][i] - batch["completion_mask"][i]).sum() == n_prompt
        )


def test_string_contents_of_the_pairs_stage_collate_like_list_contents(
    setup, processor, tiny_data_dir, tmp_path
):
    _pairs_frame(tiny_data_dir, n=3, strings=True).to_parquet(tmp_path / "pairs.parquet", index=False)
    collate = dpo.PreferenceCollator(processor)
    a = collate(list(dpo.to_dpo_dataset(dpo.load_pairs(tmp_path), processor, 512)))
    b = collate(list(dpo.to_dpo_dataset(dpo.load_pairs(setup["pairs"]).head(3), processor, 512)))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(
        a["completion_mask"], b["completion_mask"]
    )
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_dpo_text_and_tokens_are_the_sft_bytes(setup, processor, tiny_data_dir):
    row = load_split(tiny_data_dir, "train").iloc[0]
    messages = prompts.to_messages(list(row["conversations"]))
    sft_text = prompts.render(processor, messages)
    pair = dpo.to_dpo_dataset(dpo.load_pairs(setup["pairs"]), processor, 512)[0]
    trl_text = apply_chat_template({k: pair[k] for k in ("prompt", "chosen", "rejected")}, processor)
    assert (trl_text["prompt"] + trl_text["chosen"]).encode() == sft_text.encode()
    assert trl_text["prompt"] == prompts.render(processor, messages[:-1], add_generation_prompt=True)
    # Same token ids too: the DPO chosen row is the SFT example.
    dpo_batch = dpo.PreferenceCollator(processor)([pair])
    sft_ds, _ = to_sft_dataset(load_split(tiny_data_dir, "train").head(1), processor, 512, "fail")
    sft_batch = DataCollatorForVisionLanguageModeling(processor)([sft_ds[0]])
    assert (
        dpo_batch["input_ids"][0][dpo_batch["attention_mask"][0] == 1].tolist()
        == sft_batch["input_ids"][0][sft_batch["attention_mask"][0] == 1].tolist()
    )


def test_max_length_that_would_cut_image_tokens_is_an_error(setup, processor):
    pairs = dpo.load_pairs(setup["pairs"])
    with pytest.raises(DataError, match=r"pair '.+': .* dpo.max_length=10 and would cut image tokens"):
        dpo.to_dpo_dataset(pairs, processor, 10)
    first = dpo.to_dpo_dataset(pairs.head(1), processor, 512)[0]
    _, n_prompt, n = dpo.pair_length(
        processor, first["prompt"], first["chosen"], first["rejected"], [IMAGE_TOKENS]
    )
    assert len(dpo.to_dpo_dataset(pairs.head(1), processor, n)) == 1
    with pytest.raises(DataError, match="would cut the answer"):
        dpo.to_dpo_dataset(pairs.head(1), processor, n - 1)
    with pytest.raises(DataError, match="would cut the prompt"):
        dpo.to_dpo_dataset(pairs.head(1), processor, n_prompt - 1)
    no_image = pairs.assign(images=[[] for _ in range(len(pairs))])
    with pytest.raises(DataError, match="0 image"):
        dpo.to_dpo_dataset(no_image, processor, 512)


def _logits(model, batch):
    device = next(model.parameters()).device  # the Trainer moves the model to the GPU where there is one
    with torch.no_grad():
        return model(
            **{k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}
        ).logits.cpu()


def test_reference_is_the_start_policy_and_first_loss_is_ln2(setup, processor, tiny_model_dir, tmp_path):
    cfg = DpoConfig(
        learning_rate=1e-3, batch_size=4, logging_steps=1, epochs=0.5, warmup_ratio=0.0
    )  # one step
    model_cfg = ModelConfig(name=str(tiny_model_dir))
    train = dpo.to_dpo_dataset(dpo.load_pairs(setup["pairs"]), processor, 512)
    trainer = dpo.build_trainer(cfg, model_cfg, tiny_model_dir, setup["start"], train, processor, tmp_path, 0)
    batch = dpo.PreferenceCollator(processor)([train[i] for i in range(4)])
    model = trainer.model.eval()
    policy = _logits(model, batch)
    with use_adapter(model, dpo.REFERENCE):
        reference = _logits(model, batch)
    with use_adapter(model, None):
        base = _logits(model, batch)
    start = PeftModel.from_pretrained(modeling.load_base(str(tiny_model_dir), model_cfg), str(setup["start"]))
    assert torch.equal(policy, reference)
    assert torch.allclose(reference, _logits(start.eval(), batch), atol=1e-6)
    assert not torch.allclose(reference, base, atol=1e-3)  # the reference is the soup, not the base
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 1e-4
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # The policy moved; the reference stayed the start policy (frozen, not in the optimizer).
    model.eval()
    with use_adapter(model, dpo.REFERENCE):
        assert torch.allclose(_logits(model, batch), reference, atol=1e-6)
    assert not torch.allclose(_logits(model, batch), reference, atol=1e-4)


def test_a_reference_other_than_the_start_policy_stops_at_step_one(
    setup, processor, tiny_model_dir, tmp_path
):
    cfg = DpoConfig(batch_size=4, logging_steps=1, epochs=0.5)
    train = dpo.to_dpo_dataset(dpo.load_pairs(setup["pairs"]), processor, 512)
    model_cfg = ModelConfig(name=str(tiny_model_dir))
    trainer = dpo.build_trainer(cfg, model_cfg, tiny_model_dir, setup["start"], train, processor, tmp_path, 0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if ".ref." in name and "lora_B" in name:
                param.mul_(-3.0)
    with pytest.raises(RuntimeError, match="reference model is not the starting policy"):
        trainer.train()


def test_train_dpo_writes_the_whole_policy_loadable_alone(setup, tiny_model_dir, tmp_path):
    cfg = DpoConfig(learning_rate=1e-2, batch_size=4, logging_steps=1, epochs=1.0, warmup_ratio=0.0)
    model_cfg = ModelConfig(name=str(tiny_model_dir))
    metrics = dpo.train_dpo(cfg, model_cfg, tiny_model_dir, setup["start"], setup["pairs"], tmp_path, seed=0)
    assert abs(metrics["first_loss"] - math.log(2)) < 1e-4 and metrics["train_pairs"] == 8
    folder = tmp_path / dpo.POLICY / dpo.ADAPTER
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    trained, start = (
        load_file(folder / "adapter_model.safetensors"),
        load_file(setup["start"] / "adapter_model.safetensors"),
    )
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    curve = pd.read_parquet(tmp_path / dpo.POLICY / dpo.CURVE)
    assert {
        "step",
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    } <= set(curve)
    # Loaded alone on a fresh base, the adapter is the trained policy: not the base, not the start.
    processor = modeling.load_processor(str(tiny_model_dir))
    train = dpo.to_dpo_dataset(dpo.load_pairs(setup["pairs"]), processor, 512)
    batch = dpo.PreferenceCollator(processor)([train[i] for i in range(2)])
    loaded = PeftModel.from_pretrained(modeling.load_base(str(tiny_model_dir), model_cfg), str(folder)).eval()
    assert list(loaded.peft_config) == ["default"]
    policy = _logits(loaded, batch)
    with loaded.disable_adapter():
        base = _logits(loaded, batch)
    start_model = PeftModel.from_pretrained(
        modeling.load_base(str(tiny_model_dir), model_cfg), str(setup["start"])
    )
    assert not torch.allclose(policy, base, atol=1e-3)
    assert not torch.allclose(policy, _logits(start_model.eval(), batch), atol=1e-3)
    # Round 2 starts from this policy: its reference is round 1's policy, so its first loss is ln 2 again.
    round2 = dpo.train_dpo(
        dataclasses.replace(cfg, epochs=0.5),
        model_cfg,
        tiny_model_dir,
        folder,
        setup["pairs"],
        tmp_path / "r2",
        0,
    )
    assert abs(round2["first_loss"] - math.log(2)) < 1e-4 and round2["steps"] == 1


def _with_a_long_pair(pairs_path, out_dir):
    """The pairs plus one whose rejected answer is far longer than dpo.max_length allows."""
    pairs = dpo.load_pairs(pairs_path)
    long = pairs.iloc[[0]].copy()
    long["example_id"] = "long-one"
    long["rejected"] = [[{"role": "assistant", "content": [{"type": "text", "text": "much longer " * 300}]}]]
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.concat([pairs, long], ignore_index=True).to_parquet(out_dir / dpo.PAIRS_FILE, index=False)
    return out_dir


def test_too_long_pairs_are_counted_under_skip_and_named_under_fail(setup, processor, tmp_path):
    pairs = dpo.load_pairs(_with_a_long_pair(setup["pairs"], tmp_path))
    kept, rejects = dpo.fit_pairs(pairs, processor, 512, "skip")
    assert len(kept) == len(pairs) - 1 and "long-one" not in set(kept["example_id"])
    assert rejects.counts == {"too_long": 1} and rejects.examples == {"too_long": ["long-one"]}
    with pytest.raises(
        DataError,
        match=r"pair 'long-one': \d+ tokens .* exceed dpo.max_length=512 and would cut "
        r"the answer; raise dpo.max_length or set data.bad_rows=skip",
    ):
        dpo.fit_pairs(pairs, processor, 512, "fail")


def test_no_pairs_end_the_dpo_stage_in_one_line_before_any_trial(
    setup, tiny_model_dir, tiny_config, tmp_path, capsys
):
    import json

    import ray

    from ray_jobs import dpo as dpo_job
    from ray_jobs.session import cli

    folder = tmp_path / "pairs-0123"
    folder.mkdir()
    pd.DataFrame(columns=list(dpo.PAIR_COLUMNS)).to_parquet(folder / dpo.PAIRS_FILE, index=False)
    diagnostics = {"ties": {"k": 30, "n": 32}, "unparsed": {"k": 4, "n": 64}}
    (folder / "manifest.json").write_text(
        json.dumps({"metrics": {"prompts": 32, "pairs": 0, "diagnostics": diagnostics}})
    )
    cfg = tiny_config()
    store = dpo_job.RunStore(cfg.run.root)
    with pytest.raises(SystemExit) as exit_info:
        cli(dpo_job.run)(cfg, store, str(tiny_model_dir), str(setup["start"]), str(folder))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and not any("Traceback" in line for line in err)
    assert err[-1] == (
        "error: pairs 'pairs-0123': no preference pair from 32 prompts (30 with best and worst sample tied, 4 of 64 "
        "verdicts unparsed); DPO has nothing to learn from: give the pairs stage more prompts (pairs.limit), more "
        "samples per prompt (pairs.k), a lower pairs.tie_margin, or another pairs.judge"
    )
    assert not ray.is_initialized() and not (Path(store.base) / "dpo").exists()


def test_the_dpo_driver_s_flags_are_on_its_one_parser(tmp_path, capsys):
    from ray_jobs import dpo as dpo_job

    with pytest.raises(SystemExit) as exit_info:
        dpo_job.main(["--help"])
    assert exit_info.value.code == 0 and {"--pairs", "--start-adapter", "--round"} <= set(
        capsys.readouterr().out.split()
    )
    with pytest.raises(SystemExit) as exit_info:
        dpo_job.main(["configs/tiny.yaml", f"run.root={tmp_path}", "--pairs", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        exit_info.value.code == 2
        and len(err) == 1
        and err[0].startswith("error: the dpo driver on its own needs --start-adapter; ")
    )


@pytest.mark.slow
def test_dpo_runs_as_a_tune_trial_and_skips_when_done(
    setup, tiny_model_dir, tiny_config, tmp_path, local_ray
):

    from ray_jobs import dpo as dpo_job

    cfg = tiny_config(
        dpo={
            "batch_size": 4,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "epochs": 1,
            "holdout_fraction": 0.0,
        },
        resources={"cpus_per_trial": 1},
    )
    store = dpo_job.RunStore(cfg.run.root)
    # One pair too long for dpo.max_length (256): under data.bad_rows: skip it is counted, the rest train.
    pairs = _with_a_long_pair(setup["pairs"], tmp_path / "pairs-long")
    args = (cfg, store, str(tiny_model_dir), str(setup["start"]), str(pairs))
    path = dpo_job.run(*args)
    manifest = store.manifest("dpo", path.rsplit("dpo-", 1)[1])
    assert manifest["inputs"]["start_adapter"] == str(setup["start"])
    assert abs(manifest["metrics"]["first_loss"] - math.log(2)) < 1e-4
    assert manifest["metrics"]["pairs_too_long"] == 1 and manifest["metrics"]["train_pairs"] == 8
    assert manifest["metrics"]["pairs_too_long_examples"] == {"too_long": ["long-one"]}
    curve = pd.read_parquet(f"{path}/{dpo_job.CURVES}")
    assert len(curve) == 2 and (curve["round"] == 1).all()
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(
        curve
    )
    loaded = PeftModel.from_pretrained(
        modeling.load_base(str(tiny_model_dir), ModelConfig(name=str(tiny_model_dir))), f"{path}/adapter"
    )
    assert list(loaded.peft_config) == ["default"]
    # A second run finds the complete artifact and does not retrain (no Ray needed).
    assert dpo_job.run(*args) == path
