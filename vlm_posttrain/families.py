"""Model families as data: what differs between LLaVA-1.5, LLaVA-OneVision and Qwen2/2.5-VL, declared once.

Every stage is generic over a :class:`Family`: its chat template (the family's own, the assistant span inside
``{% generation %}`` markers for TRL's answer-only loss), the token its processor expands per image, the
language model's LoRA target, the modules kept out of 4-bit, the projector trained by ``train_projector``,
the self-judge's label letters, and which processor outputs are per-image patch lists (concatenated across a
batch) rather than one array per prompt. How many tokens an image becomes is asked of the family's processor
(:func:`image_tokens`), never assumed: 576 for LLaVA-1.5, a function of the image size for the others.

    family = families.detect("llava-hf/llava-onevision-qwen2-7b-ov-hf")   # by config.json's model_type
    family.chat_template, family.lora_target, families.image_tokens(processor, image)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vlm_posttrain import prompts
from vlm_posttrain.config import LORA_LANGUAGE_TARGET


def _trl_template(name: str) -> str:
    # TRL's own copies (what trl.chat_template_utils compares and returns), read without importing that
    # module (7 s): config loading detects families.
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()


# llava-hf/llava-onevision-qwen2-*-ov-hf's chat template as shipped (transformers'
# convert_llava_onevision_weights_to_hf.py writes it); its generation markers leave "<|im_end|>" unsupervised.
ONEVISION_SHIPPED_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same bytes, with the answer's "<|im_end|>\n" inside the generation span (so SFT teaches the model to
# stop, as TRL's Qwen2.5-VL training template does) and string contents accepted (TRL's preference rows).
ONEVISION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- for p in parts if p['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'video' -%}{{ '<video>\n' }}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ '<|im_end|>\n' }}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


# Processor outputs with one entry per token (Qwen2-VL's image/text types, Gemma's): they grow with input_ids.
TOKEN_TYPE_KEYS = frozenset({"token_type_ids", "mm_token_type_ids"})


@dataclass(frozen=True)
class Family:
    name: str
    # config.json's model_type values of this family.
    model_types: tuple[str, ...]
    # The training template (the family's bytes, the assistant turn in generation markers) and the template
    # the checkpoints ship, which a test renders beside it.
    chat_template: str
    shipped_template: str
    # The token the processor expands into one image's tokens.
    image_token: str
    # What ends an assistant turn in the template (its EOS, and what follows it).
    answer_end: str
    lora_target: str = LORA_LANGUAGE_TARGET
    # bitsandbytes matches these from the start of the module path.
    skip_quantization: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    # The modules ``sft.train_projector`` trains in full (PEFT's modules_to_save), and the vision tower.
    projector: str = "multi_modal_projector"
    vision_tower: str = "vision_tower"
    self_judge_labels: tuple[str, str] = prompts.SELF_JUDGE_LABELS
    # Processor outputs that list every image's patches with no per-prompt axis (Qwen2-VL's): a batch
    # concatenates them; every other output has one entry per prompt and is stacked.
    flat_vision_keys: tuple[str, ...] = ()


LLAVA = Family(
    name="llava",
    model_types=("llava",),
    chat_template=prompts.LLAVA_15_TEMPLATE,
    # llava-hf's processors ship a template without the "</s>" the original LLaVA-1.5 trained on; the
    # project uses the original Vicuna-v1 form (FIELD_NOTES), so the shipped one is ours.
    shipped_template=prompts.LLAVA_15_TEMPLATE,
    image_token="<image>",
    answer_end="</s>",
)

LLAVA_ONEVISION = Family(
    name="llava_onevision",
    model_types=("llava_onevision",),
    chat_template=ONEVISION_TEMPLATE,
    shipped_template=ONEVISION_SHIPPED_TEMPLATE,
    image_token="<image>",
    answer_end="<|im_end|>\n",
)

QWEN2_VL = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    # TRL's training variant of the template both ship (byte-identical between the two).
    chat_template=_trl_template("qwen2_5_vl_training"),
    shipped_template=_trl_template("qwen2_5_vl"),
    image_token="<|image_pad|>",
    answer_end="<|im_end|>\n",
    skip_quantization=("model.visual", "lm_head"),
    projector="merger",
    vision_tower="visual",
    flat_vision_keys=("pixel_values", "image_grid_thw"),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAVA, LLAVA_ONEVISION, QWEN2_VL)}
_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
SUPPORTED = ", ".join(sorted(_BY_TYPE))


class UnknownArchitecture(ValueError):
    """A model whose architecture no family declares."""


def by_model_type(model_type: str, source: str = "") -> Family:
    """The family of a config.json ``model_type``; one line naming the supported ones otherwise."""
    if model_type not in _BY_TYPE:
        where = f"model '{source}': " if source else ""
        raise UnknownArchitecture(
            f"{where}architecture '{model_type}' is not supported; supported model types: {SUPPORTED}"
        )
    return _BY_TYPE[model_type]


def model_type_of(path: str) -> str | None:
    """config.json's ``model_type`` of a local folder or a cached hub id; None where it cannot be read offline."""
    local = Path(path).expanduser()
    candidates = [local / "config.json"]
    cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    snapshots = cache / f"models--{path.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir():
        candidates += sorted(snapshots.glob("*/config.json"))
    for file in candidates:
        if file.is_file():
            return json.loads(file.read_text()).get("model_type")
    return None


def known_model_type(path: str) -> str | None:
    """The ``model_type`` of a folder or cached hub id, else of a published checkpoint; None when unknown."""
    from vlm_posttrain.published import PUBLISHED

    model_type = model_type_of(path)
    if model_type is None and path in PUBLISHED:
        model_type = PUBLISHED[path].model_type
    return model_type


def detect(path: str) -> Family:
    """The family of a model folder or hub id (its config.json, or a published checkpoint's known type)."""
    model_type = known_model_type(path)
    if model_type is None:
        raise UnknownArchitecture(
            f"model '{path}': no config.json to read its architecture from; set model.name to a model folder "
            "or a downloaded hub id"
        )
    return by_model_type(model_type, path)


def of_processor(processor) -> Family:
    """The family of a policy processor, by the training template ``modeling.load_processor`` gave it."""
    family = next((f for f in FAMILIES.values() if f.chat_template == processor.chat_template), None)
    if family is None:
        raise ValueError(
            "this processor's chat template is no family's training template; load it with "
            "modeling.load_processor"
        )
    return family


def image_tokens(processor, image) -> int:
    """How many tokens ``image`` becomes for this processor: its image token expanded, as the processor does it.

    Depends only on the image's size for every family here, so it is cached by size on the processor.
    """
    cache = processor.__dict__.setdefault("_image_tokens_by_size", {})
    width, height = image.size
    if (width, height) not in cache:
        # The processor's own count (what vLLM asks it), without resizing any pixels; else expand and count.
        counter = getattr(processor, "_get_num_multimodal_tokens", None)
        counted = counter(image_sizes=[(height, width)]) if counter else None
        tokens = getattr(counted, "num_image_tokens", None)
        cache[(width, height)] = int(tokens[0]) if tokens else _expand_and_count(processor, (width, height))
    return cache[(width, height)]


def _expand_and_count(processor, size: tuple[int, int]) -> int:
    from PIL import Image

    token = processor.image_token
    probe = processor(text=[token], images=[Image.new("RGB", size)], return_tensors="np")
    return int((probe["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids(token)).sum())
