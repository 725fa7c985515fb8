"""LLaVA-1.5-7B's real tokenizer and processor, rebuilt offline, on a shallow model with the real ids and shapes.

No hub is reachable here, and the tiny model's home-made BPE has neither Llama-2's BOS convention nor its
"▁" behaviour, so faults of the real checkpoint's token handling never show on it. This builds, from the
Llama-2 SentencePiece vocabulary in GGUF form (``../shared/data/tokenizers/llama2-spm.gguf``), the processor
of llava-hf/llava-1.5-7b-hf: ``<image>`` = 32000 (special), ``<pad>`` = 32001, BOS on, left padding; CLIP's
image processor at 336 px (bicubic, centre crop, CLIP's mean and std); ``LlavaProcessor`` with patch 14,
strategy "default" and one additional token, so ``<image>`` becomes 576 tokens. The model is a
``LlavaForConditionalGeneration`` with the real vocabulary (32064 rows), image token, pad id, 576 image
tokens, ``vision_feature_layer=-2`` and a 336/14 CLIP input, at small widths (it trains on a CPU).

The GGUF's own pre-tokenizer (Metaspace, prepend "first") does not give the ids vLLM documents for this
model; two pipelines do, and both are built: ``legacy`` (the Llama-2 normalizer: prepend "▁", spaces to
"▁", no pre-tokenizer; most likely what the hub's tokenizer.json holds) and ``metaspace`` (Metaspace with
prepend "always").

    python -c "from vlm_posttrain.llava15 import build_llava15; build_llava15('/tmp/llava15', 'legacy')"
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlm_posttrain.prompts import LLAVA_15_TEMPLATE
from vlm_posttrain.published import CLIP_MEAN, CLIP_STD

Pipeline = Literal["legacy", "metaspace"]
PIPELINES: tuple[Pipeline, ...] = ("legacy", "metaspace")
GGUF_FILE = "llama2-spm.gguf"
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
VOCAB_ROWS = 32064  # llava-hf pads the embedding to a multiple of 64
IMAGE_SIZE = 336
PATCH = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH) ** 2  # 576


# Source: llava-hf/llava-1.5-7b-hf and llava-hf/llava-1.5-13b-hf, config.json, with the transformers defaults
# those files rely on (the Llama sizes, CLIP's quick_gelu) written out, so a change of defaults cannot move them.
_CLIP_VIT_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_LLAVA_15 = {
    "model_type": "llava",
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "image_seq_length": 576,
    "tie_word_embeddings": False,
}
_VICUNA = {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
PUBLISHED_CONFIGS = {
    "7b": {
        **_LLAVA_15,
        "vision_config": _CLIP_VIT_L_336,
        "text_config": {
            **_VICUNA,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
    },
    "13b": {
        **_LLAVA_15,
        "vision_config": _CLIP_VIT_L_336,
        "text_config": {
            **_VICUNA,
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 40,
        },
    },
}


def published_config(size: Literal["7b", "13b"]) -> LlavaConfig:
    """LLaVA-1.5-7B's or -13B's config as published (config only: no weights), for estimates and benchmarks."""
    data = copy.deepcopy(PUBLISHED_CONFIGS[size])
    data.pop("model_type")
    return LlavaConfig(**data)


def shared_gguf() -> Path | None:
    """The Llama-2 vocabulary in ../shared/data/tokenizers beside the checkout, where there is one."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / GGUF_FILE
    return path if path.is_file() else None


def build_tokenizer(gguf_path: str | Path, pipeline: Pipeline = "legacy"):
    """The Llama-2 tokenizer as llava-hf ships it, with the pre-tokenization ``pipeline`` chosen."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline '{pipeline}': choose one of {', '.join(PIPELINES)}")
    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    backend = tok.backend_tokenizer
    if pipeline == "legacy":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    else:
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="always", split=False
        )
    # The order gives llava-hf's ids: <image> 32000, then <pad> 32001.
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens(
        {"pad_token": AddedToken("<pad>", special=True, normalized=False)},
        replace_extra_special_tokens=False,
    )
    tok.image_token = "<image>"
    ids = tok.convert_tokens_to_ids(["<image>", "<pad>"])
    if ids != [IMAGE_TOKEN_ID, PAD_TOKEN_ID]:
        raise RuntimeError(f"<image>, <pad> got ids {ids}, expected {IMAGE_TOKEN_ID}, {PAD_TOKEN_ID}")
    tok.padding_side = "left"
    tok.chat_template = LLAVA_15_TEMPLATE
    return tok


def image_processor() -> CLIPImageProcessorPil:
    """llava-hf/llava-1.5-*-hf's image processor: 336 px, bicubic, centre crop, CLIP's mean and std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # bicubic
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def build_processor(gguf_path: str | Path, pipeline: Pipeline = "legacy") -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=build_tokenizer(gguf_path, pipeline),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_TEMPLATE,
    )


def llava15_config(hidden: int = 64, layers: int = 2, vision_hidden: int = 32, vision_layers: int = 2):
    """LLaVA-1.5's ids and shapes at small widths (the real model: hidden 4096, 32 layers; CLIP 1024, 24)."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB_ROWS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_TOKEN_ID,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=IMAGE_SEQ_LENGTH,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )


def build_llava15(
    out_dir: str | Path, gguf_path: str | Path, pipeline: Pipeline = "legacy", seed: int = 0
) -> Path:
    """Save a randomly initialised LLaVA-1.5-shaped model and the real processor to ``out_dir``."""
    out = Path(out_dir)
    processor = build_processor(gguf_path, pipeline)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava15_config())
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
