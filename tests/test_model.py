"""The model stage's offline tiny LLaVA: same classes, processor and chat template as llava-hf/llava-1.5-7b-hf."""

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlm_posttrain import prompts
from vlm_posttrain.tiny import IMAGE_SEQ_LENGTH


def test_builds_saves_and_reloads(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert isinstance(processor, LlavaProcessor) and isinstance(model, LlavaForConditionalGeneration)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    text = prompts.render(
        processor, prompts.to_messages([{"from": "human", "value": "<image>\nWhat?"}]), True
    )
    assert text == "<s>USER: <image>\nWhat? ASSISTANT:"
    batch = processor(text=[text], images=[Image.new("RGB", (50, 40), "white")], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == IMAGE_SEQ_LENGTH
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == len(processor.tokenizer) and torch.isfinite(logits).all()


def test_generates_with_left_padding(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert processor.tokenizer.padding_side == "left"
    texts = ["USER: <image>\nWhat? ASSISTANT:", "USER: <image>\nWhich bar is the highest of all? ASSISTANT:"]
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 5
