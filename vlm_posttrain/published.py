"""The published checkpoints the study configs name, as data: their config.json and image-processor settings.

No hub is reachable here, so the preflight plan and the memory estimate read a shipped study config's model
from these (config only: no weights, no tokenizer; importing this module loads no model library). Values are
the checkpoints' config.json and preprocessor_config.json with the defaults they rely on written out.

    config = PUBLISHED["Qwen/Qwen2.5-VL-7B-Instruct"].config()       # a transformers config
    image_processor = PUBLISHED["Qwen/Qwen2.5-VL-7B-Instruct"].image_processor()
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# OpenAI CLIP's normalisation, which LLaVA-1.5's and Qwen2-VL's image processors use.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-OneVision's anyres grids: every (h, w) of multiples of 384 up to 6 x 6.
ONEVISION_GRID = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

_QWEN2_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

_ONEVISION_7B = {
    "text_config": {
        **_QWEN2_7B,
        "model_type": "qwen2",
        "vocab_size": 152128,
        "max_position_embeddings": 32768,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 26,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "vision_use_head": False,
    },
    "image_token_index": 151646,
    "video_token_index": 151647,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "image_grid_pinpoints": ONEVISION_GRID,
    "vision_aspect_ratio": "anyres_max_9",
    "projector_hidden_act": "gelu",
    "image_seq_length": 729,
    "tie_word_embeddings": False,
}

_QWEN2_5_VL_7B = {
    "text_config": {
        **_QWEN2_7B,
        "model_type": "qwen2_5_vl_text",
        "vocab_size": 152064,
        "max_position_embeddings": 128000,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}


def _onevision_image_processor():
    from transformers import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=ONEVISION_GRID,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
        do_pad=True,
    )


def _qwen2_5_vl_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def _config(model_type: str, data: dict) -> Callable[[], Any]:
    def build():
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type, **copy.deepcopy(data))

    return build


@dataclass(frozen=True)
class Published:
    model_type: str
    config: Callable[[], Any]
    image_processor: Callable[[], Any]
    # The processor's own arguments besides its image processor and tokenizer.
    processor_kwargs: dict


def _llava15_config(size: str):
    from vlm_posttrain import llava15

    return llava15.published_config(size)


def _llava15_image_processor():
    from vlm_posttrain import llava15

    return llava15.image_processor()


def _llava15(size: str) -> Published:
    return Published(
        "llava",
        lambda: _llava15_config(size),
        _llava15_image_processor,
        {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
    )


PUBLISHED: dict[str, Published] = {
    "llava-hf/llava-1.5-7b-hf": _llava15("7b"),
    "llava-hf/llava-1.5-13b-hf": _llava15("13b"),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": Published(
        "llava_onevision",
        _config("llava_onevision", _ONEVISION_7B),
        _onevision_image_processor,
        {
            "num_image_tokens": 729,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
    ),
    "Qwen/Qwen2.5-VL-7B-Instruct": Published(
        "qwen2_5_vl", _config("qwen2_5_vl", _QWEN2_5_VL_7B), _qwen2_5_vl_image_processor, {}
    ),
}


def stand_in_processor(model_id: str):
    """The published checkpoint's processor, rebuilt offline: its image processor and processor arguments, so
    image-token counts are exact; the tokenizer is the real Llama-2 one for LLaVA-1.5 where ../shared has it,
    else the tiny BPE in the family's shape (``text_tokens_exact`` False: text lengths are approximate)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from vlm_posttrain import families, llava15, modeling, tiny

    published = PUBLISHED[model_id]
    family = families.by_model_type(published.model_type, model_id)
    gguf = llava15.shared_gguf()
    if family.name == "llava" and gguf is not None:
        tokenizer, exact = llava15.build_tokenizer(gguf), True
    elif family.name == "llava":
        tokenizer, exact = tiny.build_tokenizer(), False
    else:
        tokenizer, exact = tiny.build_chatml_tokenizer(family.name), False
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[published.model_type])
    processor = modeling.image_only(cls)(
        image_processor=published.image_processor(),
        tokenizer=tokenizer,
        chat_template=family.chat_template,
        **published.processor_kwargs,
    )
    processor.text_tokens_exact = exact
    return processor
