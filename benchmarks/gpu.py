"""LLaVA-1.5-7B-shaped training and generation on one CUDA GPU, each figure against its bound.

Runs only where CUDA is present; elsewhere it prints a skip message and exits 0. No download: the model
is built from config (CLIP ViT-L/14-336 + Llama-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocab
32064) with random weights, directly on the GPU in bf16, with a processor made of the tiny tokenizer and
a 336 px CLIP image processor (576 image tokens). It measures, in a few minutes:

- the bf16 matmul peak (8192^3 GEMMs) and the copy bandwidth of the card: the bounds;
- LoRA (bf16 base) and QLoRA (NF4 base, loaded through ``vlm_posttrain.modeling.load_base``) training
  through TRL's SFTTrainer exactly as a trial runs (``vlm_posttrain.sft.trainer_args``: bf16 autocast,
  activation checkpointing, AdamW): tokens/s and MFU at 4N FLOPs per token (N = the language model's
  matmul parameters; checkpointing really costs ~5N, attention and the vision tower are not counted);
- greedy generation at batch 1 and a large batch: decode tokens/s against the bandwidth bound (every
  step reads the LM weights and the KV cache);
- the peak memory of the QLoRA trial (``torch.cuda.max_memory_allocated``) against
  ``vlm_posttrain.memory.estimate_trial_memory``.

    python -m benchmarks.gpu [--batch 4] [--text-tokens 256] [--gen-batch 32] [--out FILE]
    python -m benchmarks.gpu --smoke      # the same code on CPU at toy sizes (a test of this script)
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median, offline_env, parser, print_table, report

SKIP = (
    "skipped: benchmarks/gpu.py needs a CUDA device and none is visible (torch.cuda.is_available() is False)"
)


def build_parser():
    p = parser("gpu", __doc__)
    p.add_argument("--batch", type=int, default=4, help="training batch size (the study's: 4)")
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens per example besides the image")
    p.add_argument("--steps", type=int, default=6, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=32, help="the large generation batch")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    p.add_argument(
        "--smoke", action="store_true", help="toy sizes on CPU: checks this script, measures nothing"
    )
    return p


def model_config(tokenizer, smoke: bool):
    """LLaVA-1.5-7B's published config (``vlm_posttrain.llava15``), or a small one for ``--smoke``, with this
    tokenizer's ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vlm_posttrain.llava15 import published_config

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if not smoke:
        config = published_config("7b")
        for key, value in ids.items():
            setattr(config.text_config, key, value)
        config.image_token_index, config.pad_token_id = image_token, tokenizer.pad_token_id
        return config
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56
    )
    text = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(**text, max_position_embeddings=4096, **ids),
        image_token_index=image_token,
        image_seq_length=(vision["image_size"] // 14) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )


def processor_for(image_size: int):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from vlm_posttrain.prompts import LLAVA_15_TEMPLATE
    from vlm_posttrain.tiny import build_tokenizer

    size = {"shortest_edge": image_size}
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size=size, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_TEMPLATE,
    )


# --------------------------------------------------------------------------- bounds


def _timed(fn, device, repeats: int) -> list[float]:
    import torch

    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(device, smoke: bool) -> float:
    """Best bf16 GEMM FLOP/s over a few square multiplies (the MFU denominator)."""
    import torch

    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    _timed(lambda: a @ b, device, 3)
    return 2 * n**3 / min(_timed(lambda: a @ b, device, 10))


def copy_bandwidth(device, smoke: bool) -> float:
    """Best device-to-device copy rate in bytes/s, read plus write (the decoding bound)."""
    import torch

    size = 2**24 if smoke else 2**31
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    _timed(lambda: y.copy_(x), device, 2)
    return 2 * size / min(_timed(lambda: y.copy_(x), device, 10))


# --------------------------------------------------------------------------- model, data, training


def build_model(config, device, dtype):
    import torch
    from transformers import LlavaForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def dataset(processor, n: int, text_tokens: int, image_size: int):
    """SFT rows in the project's format, each with one image and about ``text_tokens`` text tokens."""
    import random

    import datasets
    from PIL import Image

    from vlm_posttrain.tiny import _WORDS

    words, rng = _WORDS.split(), random.Random(0)
    rows = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(text_tokens // 3))
        answer = " ".join(rng.choice(words) for _ in range(text_tokens - text_tokens // 3))
        image = Image.new("RGB", (image_size, image_size), (i * 7 % 255, 90, 160))
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        rows.append({"images": [image], "messages": messages})
    return datasets.Dataset.from_list(rows)


def step_timer(device):
    """A Trainer callback timing each optimizer step (forward, backward, update), data loading excluded."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(model, processor, data, args, device, compute_dtype: str) -> tuple[float, int]:
    """Run warm-up + timed steps through TRL's SFTTrainer as a trial does; median step seconds, sequence length."""
    from trl import SFTTrainer

    from vlm_posttrain.config import SftConfig
    from vlm_posttrain.sft import trainer_args

    out = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    sft = SftConfig(learning_rate=1e-4, batch_size=args.batch, logging_steps=1000)
    targs = trainer_args(sft, out, 0, compute_dtype, False)
    targs.max_steps, targs.save_strategy = 2 + args.steps, "no"
    timer = step_timer(device)
    trainer = SFTTrainer(
        model=model, args=targs, train_dataset=data, processing_class=processor, callbacks=[timer]
    )
    seq_len = trainer.data_collator([data[i] for i in range(args.batch)])["input_ids"].shape[1]
    trainer.train()
    return median(timer.times[2:]), seq_len


def lm_matmul_params(config) -> int:
    """N for the MFU: the language model's projection and LM-head weights (no embeddings, no vision tower)."""
    from vlm_posttrain.memory import model_shape, param_counts

    shape = model_shape(config)
    return param_counts(shape)["language_linear"] + shape.vocab * shape.hidden


def training_row(name, step_s, batch, seq_len, n_params, peak_flops) -> dict:
    tokens_s = batch * seq_len / step_s
    bound = peak_flops / (4 * n_params)
    return {"figure": f"{name} train tokens/s", "value": tokens_s, "bound": bound, "ratio": tokens_s / bound}


# --------------------------------------------------------------------------- generation


def generation_rows(model, processor, config, args, device, bandwidth: float) -> list[dict]:
    rows = []
    for batch in (1, args.gen_batch):
        decode_s, prompt_len = _decode_seconds(model, processor, batch, args.new_tokens, config, device)
        tokens_s = batch * (args.new_tokens - 1) / decode_s
        bound = batch / (_decode_step_bytes(config, batch, prompt_len + args.new_tokens // 2) / bandwidth)
        row = {"figure": f"generate b={batch} decode tokens/s", "value": tokens_s, "bound": bound}
        rows.append({**row, "ratio": tokens_s / bound})
    return rows


def _decode_seconds(model, processor, batch, new_tokens, config, device) -> tuple[float, int]:
    """Seconds for new_tokens-1 decode steps: generate(n) minus generate(1) (the prefill), medians of 3."""
    import torch
    from PIL import Image

    from vlm_posttrain.prompts import render

    size = config.vision_config.image_size
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the value"}]}
    ]
    text = render(processor, messages, add_generation_prompt=True)
    images = [Image.new("RGB", (size, size), (40, 90, 160))] * batch
    inputs = processor(text=[text] * batch, images=images, return_tensors="pt", padding=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    def run(n):
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    run(2)
    full = median(_timed(lambda: run(new_tokens), device, 3))
    prefill = median(_timed(lambda: run(1), device, 3))
    return full - prefill, inputs["input_ids"].shape[1]


def _decode_step_bytes(config, batch: int, context: int) -> float:
    """Bytes one decode step must read: the bf16 LM weights and every sequence's KV cache."""
    text = config.text_config
    kv_dim = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    kv = batch * context * text.num_hidden_layers * 2 * kv_dim * 2
    return 2 * lm_matmul_params(config) + kv


# --------------------------------------------------------------------------- QLoRA memory


def qlora_row_and_memory(
    folder, processor, data, args, device, config, n_params, peak
) -> tuple[list[dict], dict]:
    """Load the saved model as the project does in 4-bit, train a few steps, compare peak with the estimate."""
    import torch

    from vlm_posttrain import modeling
    from vlm_posttrain.config import ModelConfig
    from vlm_posttrain.memory import RUNTIME_BYTES, estimate_trial_memory

    compute = "float32" if args.smoke else "bfloat16"
    model_cfg = ModelConfig(name=str(folder), load_in_4bit=True, compute_dtype=compute)
    base = modeling.load_base(str(folder), model_cfg, device_map=None if args.smoke else "cuda")
    model = modeling.attach_lora(base, _lora(args, model_cfg), seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s, seq_len = train_steps(model, processor, data, args, device, compute)
    est = estimate_trial_memory(
        config, True, args.lora_r, args.batch, seq_len, compute_dtype=compute, device=device.type
    )
    memory = {"estimate": est, "seq_len": seq_len}
    rows = [training_row("QLoRA", step_s, args.batch, seq_len, n_params, peak)]
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated()
        memory.update(max_allocated=allocated, max_reserved=torch.cuda.max_memory_reserved())
        free, total = torch.cuda.mem_get_info()
        memory["process_overhead_now"] = total - free - torch.cuda.memory_reserved()
        want = est["total"] - RUNTIME_BYTES
        rows.append({"figure": "QLoRA trial peak GB", "value": allocated / 1e9, "bound": want / 1e9})
        rows[-1]["ratio"] = allocated / want
    return rows, memory


def _lora(args, model_cfg):
    from vlm_posttrain import modeling
    from vlm_posttrain.config import SftConfig

    sft = SftConfig(lora_r=args.lora_r, lora_alpha=16, lora_dropout=0.05)
    return modeling.lora_config(sft, model_cfg.lora_target)


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    offline_env()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print(SKIP)
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    compute = "float32" if args.smoke else "bfloat16"
    peak, bandwidth = matmul_peak(device, args.smoke), copy_bandwidth(device, args.smoke)
    rows = [
        {"figure": "bf16 matmul TFLOP/s", "value": peak / 1e12},
        {"figure": "copy bandwidth GB/s", "value": bandwidth / 1e9},
    ]
    started = time.perf_counter()
    image_size = 56 if args.smoke else 336
    processor = processor_for(image_size)
    config = model_config(processor.tokenizer, args.smoke)
    n_params = lm_matmul_params(config)
    data = dataset(processor, args.batch * (2 + args.steps), args.text_tokens, image_size)
    model = build_model(config, device, dtype)
    rows += generation_rows(model, processor, config, args, device, bandwidth)
    with tempfile.TemporaryDirectory(prefix="llava7b-random-") as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        from vlm_posttrain import modeling
        from vlm_posttrain.config import ModelConfig

        lora_model = modeling.attach_lora(model, _lora(args, ModelConfig(name=folder)), seed=0)
        step_s, seq_len = train_steps(lora_model, processor, data, args, device, compute)
        rows.append(training_row("LoRA bf16", step_s, args.batch, seq_len, n_params, peak))
        del model, lora_model
        _release()
        qlora_rows, memory = qlora_row_and_memory(
            folder, processor, data, args, device, config, n_params, peak
        )
    rows += qlora_rows
    print_table(rows, ["figure", "value", "bound", "ratio"])
    summary = {
        "figures": {r["figure"]: r.get("ratio", r["value"]) for r in rows},
        "qlora_memory": memory,
        "lm_matmul_params": n_params,
        "seconds": time.perf_counter() - started,
    }
    report("gpu", args.out, rows, summary, config={k: v for k, v in vars(args).items() if k != "out"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
