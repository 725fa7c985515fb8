"""The trial memory estimate and GPU sharing: the formula's shape, its 7B numbers, a check against what the
tiny model really allocates on CPU, and ``gpus_per_trial: auto`` / refusal before any trial starts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_posttrain.llava15 import published_config
from vlm_posttrain.memory import (
    check_gpu_fraction,
    estimate_trial_memory,
    gpu_share,
    model_shape,
    param_counts,
    plan_gpu_share,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llava7b():
    """LLaVA-1.5-7B's config as published (CLIP ViT-L/14-336 + Vicuna-7B, vocab 32064), config only."""
    return published_config("7b")


@pytest.fixture(scope="module", params=["7b", "13b"])
def llava_on_meta(request):
    """A published LLaVA-1.5 config and the model it builds on the meta device: every shape, no storage."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config = published_config(request.param)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return config, model


def _real_param_counts(model) -> dict[str, int]:
    """The meta model's parameters split the way ``param_counts`` splits them."""
    linear = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.")
    counts = dict.fromkeys(("language_linear", "language_other", "vision", "projector"), 0)
    for name, param in model.named_parameters():
        if linear.match(name):
            part = "language_linear"
        elif name.startswith(("model.language_model.", "lm_head.")):
            part = "language_other"
        elif name.startswith("model.vision_tower."):
            part = "vision"
        elif name.startswith("model.multi_modal_projector."):
            part = "projector"
        else:
            raise AssertionError(f"parameter {name} belongs to no part")
        counts[part] += param.numel()
    return counts


def test_meta_model_holds_no_memory(llava_on_meta):
    config, model = llava_on_meta
    assert {p.device.type for p in model.parameters()} == {"meta"}
    # vision_feature_layer -2 reads the second-to-last layer, but the model still holds all 24 CLIP
    # layers and the post-LayerNorm (unused in forward): the estimate counts what is loaded.
    assert config.vision_feature_layer == -2
    assert len(model.model.vision_tower.encoder.layers) == config.vision_config.num_hidden_layers == 24
    assert model.model.vision_tower.post_layernorm is not None


def test_param_counts_match_the_meta_model(llava_on_meta):
    config, model = llava_on_meta
    estimated = param_counts(model_shape(config))
    real = _real_param_counts(model)
    assert set(estimated) == set(real)
    estimated["total"], real["total"] = sum(estimated.values()), sum(real.values())
    assert real["total"] == sum(p.numel() for p in model.parameters())
    errors = {part: abs(estimated[part] - real[part]) / real[part] for part in real}
    assert max(errors.values()) < 0.005, (errors, estimated, real)


def test_linear_dims_match_the_meta_model(llava_on_meta):
    config, model = llava_on_meta
    shape = model_shape(config)
    layer = model.model.language_model.layers[0]
    for name, dims in shape.linear_dims().items():
        parent = layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
        proj = getattr(parent, name)
        assert (proj.in_features, proj.out_features) == dims, name
    assert shape.image_tokens == 576 == config.image_seq_length
    assert shape.layers == len(model.model.language_model.layers)


def _qlora(config, **kw):
    args = dict(load_in_4bit=True, lora_r=16, batch_size=4, seq_len=832)
    return estimate_trial_memory(config, **{**args, **kw})["total"]


def test_estimate_grows_with_batch_sequence_and_rank(llava7b):
    assert _qlora(llava7b, batch_size=2) < _qlora(llava7b) < _qlora(llava7b, batch_size=8)
    assert _qlora(llava7b, seq_len=600) < _qlora(llava7b) < _qlora(llava7b, seq_len=2048)
    assert _qlora(llava7b, lora_r=8) < _qlora(llava7b) < _qlora(llava7b, lora_r=64)
    assert _qlora(llava7b) < _qlora(llava7b, train_projector=True)


def test_llava_7b_numbers(llava7b):
    # The parameter count equals the meta-device model's (checked once: 7,063,427,072).
    assert sum(param_counts(model_shape(llava7b)).values()) == 7_063_427_072
    assert model_shape(llava7b).image_tokens == 576
    four = estimate_trial_memory(llava7b, True, 16, 4, 2048)
    bf16 = estimate_trial_memory(llava7b, False, 16, 4, 2048)
    assert four["weights"] < bf16["weights"] / 2
    assert 5.5e9 < four["weights"] < 6.0e9  # 3.3 GB NF4 linears + 2.3 GB upcast tower/embeddings/head
    assert 13.5e9 < bf16["weights"] < 14.5e9
    # The study's worst case (batch 4 x sft.max_length 2048, r=16, checkpointing on): about 15.8 GB.
    assert 12e9 < four["total"] < 20e9
    # Without activation checkpointing the same trial would need ~78 GB of activations alone.
    assert estimate_trial_memory(llava7b, True, 16, 4, 2048, gradient_checkpointing=False)["total"] > 70e9


def test_config_dict_is_read_like_the_config(llava7b):
    as_dict = llava7b.to_dict()
    assert estimate_trial_memory(as_dict, True, 16, 4, 832) == estimate_trial_memory(
        llava7b, True, 16, 4, 832
    )


def test_plan_and_refusal_messages():
    assert plan_gpu_share(16e9, 80e9) == (4, 0.25)
    assert plan_gpu_share(16e9, 80e9, max_trials=2) == (2, 0.5)
    assert plan_gpu_share(30e9, 80e9) == (2, 0.5)
    assert plan_gpu_share(20e9, 80e9)[1] == 0.3333  # Ray keeps 4 decimals: 3 x 0.3333 <= 1
    with pytest.raises(ValueError, match=r"one trial needs ~90.0 GB but the card offers 72.0 GB"):
        plan_gpu_share(90e9, 80e9)
    assert check_gpu_fraction(0.5, 30e9, 80e9) == 2
    assert check_gpu_fraction(0.25, 30e9, 80e9, max_concurrent=2) == 2  # only 2 ever run at once
    with pytest.raises(ValueError) as err:
        check_gpu_fraction(0.25, 30e9, 80e9)
    message = str(err.value)
    assert "\n" not in message
    assert "4 x ~30.0 GB = 120.0 GB > 72.0 GB usable" in message and "gpus_per_trial <= 0.5" in message


def test_auto_share_from_the_config(tiny_config, llava7b):
    study = dict(
        model={"name": "llava-hf/llava-1.5-7b-hf", "load_in_4bit": True, "compute_dtype": "bfloat16"}
    )
    sft = {"batch_size": 4, "max_length": 2048, "lora_r": 16, "grid": {"lora_alpha": [16, 8]}}
    cfg = tiny_config(**study, sft=sft, resources={"gpus_per_trial": "auto", "max_concurrent_trials": 8})
    assert cfg.resources.gpus_per_trial == "auto"
    fraction, plan = gpu_share(cfg, llava7b)
    assert fraction == 0.5 and "2 trial(s) per 80 GB card" in plan  # capped by the grid's 2 trials
    small = tiny_config(**study, sft=sft, resources={"gpus_per_trial": "auto", "gpu_memory_gb": 24})
    assert gpu_share(small, llava7b)[0] == 1.0
    with pytest.raises(ValueError, match="one trial needs"):
        gpu_share(
            tiny_config(**study, sft=sft, resources={"gpus_per_trial": "auto", "gpu_memory_gb": 12}), llava7b
        )
    cpu = tiny_config(resources={"gpus_per_trial": 0})
    assert gpu_share(cpu, llava7b) == (0.0, "")


def test_driver_refuses_a_fraction_before_any_trial(tiny_config, tiny_model_dir):
    from ray_jobs import sft as sft_job

    cfg = tiny_config(resources={"gpus_per_trial": 0.5, "max_concurrent_trials": 2, "gpu_memory_gb": 0.1})
    with pytest.raises(ValueError, match=r"gpus_per_trial=0.5 lets 2 trial\(s\) share one card"):
        sft_job.gpus_per_trial(cfg, str(tiny_model_dir))
    assert sft_job.gpus_per_trial(tiny_config(), str(tiny_model_dir)) == 0.0


def _trainer(model_dir, data_dir, tmp_path, load_in_4bit):
    """The SFT trial's model and trainer, exactly as vlm_posttrain.sft.train_trial builds them."""
    from trl import SFTTrainer

    from vlm_posttrain import modeling
    from vlm_posttrain.config import ModelConfig, SftConfig
    from vlm_posttrain.data import load_split
    from vlm_posttrain.sft import to_sft_dataset, trainer_args

    processor = modeling.load_processor(str(model_dir))
    train, _ = to_sft_dataset(load_split(data_dir, "train"), processor, 512, "skip")
    model_cfg = ModelConfig(name=str(model_dir), load_in_4bit=load_in_4bit)
    base = modeling.load_base(str(model_dir), model_cfg)
    sft = SftConfig(learning_rate=1e-3, batch_size=8, lora_r=8, lora_alpha=16, lora_dropout=0.05)
    model = modeling.attach_lora(base, modeling.lora_config(sft, model_cfg.lora_target), 0)
    args = trainer_args(sft, tmp_path, 0, "float32", with_eval=False)
    return base.config, SFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)


def _saved_tensor_bytes(trainer, batch) -> int:
    """Bytes of every distinct storage autograd saves for backward in one forward, parameters excluded."""
    import torch

    model = trainer.model
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def _peak_step_bytes(trainer, batch) -> int:
    """Peak bytes of one training step as the profiler's memory timeline sees it, plus the Adam states.

    The timeline counts every tensor the step allocates or touches (weights, adapters, activations,
    gradients, temporaries); Adam's states are allocated by the first step and never touched by forward or
    backward, so they are added from the optimizer.
    """
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    states = trainer.optimizer.state.values()
    adam = sum(t.numel() * t.element_size() for s in states for t in s.values() if torch.is_tensor(t))
    # As Trainer.train() does: TRL's default turns activation checkpointing on, and the project keeps it.
    trainer.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=trainer.args.activation_checkpointing_kwargs
    )
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        trainer.compute_loss(trainer.model, dict(batch)).backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.array(sizes).sum(axis=1).max()) + adam


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora", "qlora"])
def test_estimate_matches_the_tiny_model_on_cpu(tiny_model_dir, tiny_data_dir, tmp_path, load_in_4bit):
    """Two comparisons on one batch of the real trial path (TRL SFTTrainer, PEFT, fp32 on CPU):
    the activations formula (without checkpointing) against the bytes autograd saves, within 15%;
    the total (with checkpointing, as trials run) against the step's peak allocation, within 15%."""
    config, trainer = _trainer(tiny_model_dir, tiny_data_dir, tmp_path, load_in_4bit)
    batch = next(iter(trainer.get_train_dataloader()))
    batch_size, seq_len = batch["input_ids"].shape

    def estimate(checkpointing):
        return estimate_trial_memory(
            config,
            load_in_4bit,
            8,
            batch_size,
            seq_len,
            compute_dtype="float32",
            device="cpu",
            gradient_checkpointing=checkpointing,
        )

    saved = _saved_tensor_bytes(trainer, batch)
    assert 0.85 < estimate(False)["activations"] / saved < 1.15, (estimate(False), saved)
    peak = _peak_step_bytes(trainer, batch)
    assert 0.85 < estimate(True)["total"] / peak < 1.15, (estimate(True), peak)


def test_gpu_benchmark_skips_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stdout and "CUDA" in out.stdout
