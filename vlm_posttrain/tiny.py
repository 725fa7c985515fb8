"""A tiny LLaVA built fully offline, with the classes, processor and chat template of llava-hf/llava-1.5-7b-hf.

No hub is reachable on CI or a laptop, so every code path of the project runs on this model instead:
CLIP vision tower (hidden 32, 2 layers, 32 px, patch 8 -> 16 image tokens), a 2-layer Llama (hidden 64)
and a byte-level BPE tokenizer trained on chart words. It saves and reloads with
``AutoModelForImageTextToText`` / ``AutoProcessor`` like the real checkpoint.

    python -c "from vlm_posttrain.tiny import build_tiny_llava; build_tiny_llava('/tmp/tiny')"
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlm_posttrain import modeling
from vlm_posttrain.prompts import LLAVA_15_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_SIZE = 32
PATCH = 8
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH) ** 2

# Enough chart vocabulary that questions and answers tokenize into words, not bytes.
_WORDS = (
    "what is the value of which category has highest lowest is greater than less does series increase "
    "decrease from to overall trend increasing decreasing yes no summarize chart in one sentence bar line pie "
    "shows shares percent total apples pears kiwis mangos plums grapes france spain italy germany japan "
    "january february march april may june 2015 2016 2017 2018 2019 2020 2021 2022 2023 and at with a an "
    "of for by on are was were it this that graph figure data year years share largest smallest not "
    "available question answer user assistant image value values million billion number count rate growth "
    "between first second response better worse score out judge fair unbiased given corresponding please "
    "serve as explain your reasoning"
)


def _corpus() -> list[str]:
    words = _WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 6)]
    lines += [f"The value of {w} is {n}." for n, w in enumerate(words)]
    lines += [str(n) for n in range(200)] + ["USER: ASSISTANT: 12.5% 0.25 , . ? ! : ; ( ) -"]
    return lines * 3


def _train_bpe(special_tokens: list[str], vocab_size: int, unk_token: str | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE with LLaVA's special tokens, left padding (for batched generation)."""
    tok = _train_bpe(SPECIAL_TOKENS, vocab_size, unk_token="<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=LLAVA_15_TEMPLATE,
    )


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_TEMPLATE,
    )


def tiny_llava_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=IMAGE_SEQ_LENGTH,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny LLaVA and its processor to ``out_dir``; returns the folder."""
    out = Path(out_dir)
    processor = build_processor()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_base(
    out_dir: str | Path, examples: int, epochs: float, seed: int, family: str = "llava"
) -> dict:
    """The embedded default's "Base": the family's tiny model instruction-tuned on synthetic charts of other seeds.

    The study's base (LLaVA-1.5-7B) was already post-trained; a random tiny model is not, so it is first
    fully fine-tuned on charts the experiment's own data never contains (seed offsets), in two phases:
    ``epochs`` on ``examples`` charts asked "What kind of chart is this?" (one word: "bar", "line", "pie"),
    which teaches it to look at the image; then ``epochs`` * 0.6 on those plus as many one-sentence
    summaries and a quarter as many yes/no comparisons, which keep it a model that writes varied text and
    says "Yes" and "No". In one phase, whether the base learns to look depends on the seed (about half of
    them do). The value, extreme and trend questions are left out on purpose: their answers cannot be read
    from a 32 px image, and with them the base learns text priors and stops looking.
    The families of the embedded default's SFT data (the chart type in a new answer style, "Is this a pie
    chart?", the line's direction) are never asked.
    """
    import tempfile

    from vlm_posttrain.config import DataConfig
    from vlm_posttrain.data import build_splits
    from vlm_posttrain.sft import pretrain_full

    parts = {"kind": examples, "summary": examples, "comparison": max(1, examples // 4)}
    with tempfile.TemporaryDirectory(prefix="tiny-base-") as tmp:
        tmp = Path(tmp)
        raw = BUILDERS[family](tmp / "random", seed=seed)
        for offset, (family, limit) in enumerate(parts.items(), start=1):
            data_cfg = DataConfig(
                source="synthetic",
                limit=limit,
                val_fraction=0.0,
                test_fraction=0.0,
                synthetic_image_size=64,
                synthetic_families=[family],
            )
            build_splits(data_cfg, seed + offset * 1_000_003, tmp / family)
        looking = pretrain_full(raw, [tmp / "kind"], tmp / "looking", epochs=epochs, seed=seed)
        dirs = [tmp / f for f in parts]
        chat = pretrain_full(tmp / "looking", dirs, out_dir, epochs=0.6 * epochs, seed=seed)
        return {**chat, "looking_loss": looking["pretrain_loss"]}


CHATML_SPECIAL_TOKENS = {
    "llava_onevision": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
    "qwen2_vl": [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|image_pad|>", "<|video_pad|>",
    ],
}  # fmt: skip


def build_chatml_tokenizer(family: str, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """The tiny BPE in a Qwen2 tokenizer's shape: ChatML specials, no BOS, EOS ``<|im_end|>``, left padding."""
    from vlm_posttrain.families import FAMILIES

    tok = _train_bpe(CHATML_SPECIAL_TOKENS[family], vocab_size)
    image = FAMILIES[family].image_token
    extra = {
        "image_token": image,
        "video_token": "<video>" if family == "llava_onevision" else "<|video_pad|>",
    }
    if family == "qwen2_vl":
        extra |= {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens=extra,
        chat_template=FAMILIES[family].chat_template,
    )


def _save(model, processor, tok, out_dir: str | Path) -> Path:
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def _tiny_onevision(tok: PreTrainedTokenizerFast, chat_template: str | None, seed: int):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    # anyres at 32 px tiles: a 2:1 chart becomes 2 tiles + the overview, a square one 1 + overview.
    grid = [[32, 32], [32, 64], [64, 32]]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=grid
    )
    processor = modeling.image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=chat_template,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=grid,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>")
        if "<video>" in tok.get_vocab()
        else tok.unk_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config), processor


def build_tiny_onevision(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA-OneVision policy (SigLIP + Qwen2, anyres) with the family's tokenizer shape and template."""
    tok = build_chatml_tokenizer("llava_onevision")
    model, processor = _tiny_onevision(tok, tok.chat_template, seed)
    return _save(model, processor, tok, out_dir)


def build_tiny_qwen2_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL (its window-attention vision tower, M-RoPE, dynamic resolution) saved like a checkpoint.

    Dynamic resolution at patch 8, merge 2 within 256..4096 pixels: a 64 x 64 chart is 16 image tokens, a
    128 x 64 one (scaled down to fit) 10, a 40 x 90 one 12.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    )

    tok = build_chatml_tokenizer("qwen2_vl")
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    processor = modeling.image_only(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template
    )
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tok),
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": None,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 32,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return _save(Qwen2_5_VLForConditionalGeneration(config), processor, tok, out_dir)


BUILDERS = {
    "llava": build_tiny_llava,
    "llava_onevision": build_tiny_onevision,
    "qwen2_vl": build_tiny_qwen2_vl,
}


def build_tiny_critic(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA-OneVision (SigLIP + Qwen2), the architecture of LLaVA-Critic-7B, saved like a checkpoint.

    Its processor ships no chat template, as a converted critic checkpoint may not: the critic prompts then
    fall back to LLaVA-Critic's ChatML form (``prompts.CHATML_TEMPLATE``).
    """
    tok = build_tokenizer()
    tok.chat_template = None
    model, processor = _tiny_onevision(tok, None, seed)
    return _save(model, processor, tok, out_dir)


def build_tiny_adapter(
    model_dir: str | Path, out_dir: str | Path, r: int = 4, alpha: int = 8, seed: int = 0, std: float = 0.2
) -> Path:
    """A LoRA adapter (PEFT format) on a tiny model folder with random A and B drawn from ``seed``.

    PEFT starts B at zero, which changes nothing; a random B makes a model variant that answers differently,
    the stand-in for a trained adapter in tests and benchmarks.
    """
    from vlm_posttrain.config import LORA_LANGUAGE_TARGET, ModelConfig, SftConfig

    base = modeling.load_base(str(model_dir), ModelConfig(name=str(model_dir)))
    model = modeling.attach_lora(
        base,
        modeling.lora_config(SftConfig(lora_r=r, lora_alpha=alpha, lora_dropout=0.0), LORA_LANGUAGE_TARGET),
        seed,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(std * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
