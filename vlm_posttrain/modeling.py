"""Loading the base VLM and attaching LoRA adapters, the same way in every stage.

A base model is a hub id or a local folder (``model.name``) of any family in ``vlm_posttrain.families``;
``model.load_in_4bit`` loads it as QLoRA's NF4 base through bitsandbytes, keeping the family's vision tower,
projector and LM head unquantized. LoRA goes on the language model only (``model.lora_target`` is a regex:
PEFT's name lists also hit the vision tower). The processor always gets its family's training template.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from vlm_posttrain import families
from vlm_posttrain.config import ModelConfig, SftConfig


class ModelLoadError(ValueError):
    """A model that cannot be loaded: names the path or id and the fix."""


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_source(path: str) -> None:
    """Fail early, in one line, on a model that cannot load: a missing folder, or a hub id while offline."""
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise ModelLoadError(
            f"model '{path}': folder not found; set model.name to a saved model folder or a hub id"
        )
    if looks_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"model '{path}': no config.json there; point model.name at a saved model folder"
        )
    if looks_local and not any(local.glob("*.safetensors")) and any(local.glob("*.bin")):
        # Pickled weights can run code when loaded: only safetensors are read.
        raise ModelLoadError(
            f"model '{path}': weights only as pickled .bin files; re-save them as safetensors "
            "(save_pretrained(..., safe_serialization=True))"
        )
    if not looks_local and os.environ.get("HF_HUB_OFFLINE") == "1":
        cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        if not (cache / f"models--{path.replace('/', '--')}").exists():
            raise ModelLoadError(
                f"model '{path}': not a local folder and HF_HUB_OFFLINE=1 with no cached copy; "
                "download it where the hub is reachable and set model.name to its folder"
            )


def load_processor(path: str, trust_remote_code: bool = False):
    """The policy's processor with its family's training template (every prompt renders through it)."""
    check_source(path)
    family = families.detect(path)
    processor = load_any_processor(path, trust_remote_code)
    processor.chat_template = family.chat_template
    return processor


def load_base(path: str, cfg: ModelConfig, device_map: str | None = None):
    """The base VLM, in 4-bit NF4 when configured. Weights from safetensors only."""
    check_source(path)
    kwargs = {
        "dtype": _dtype(cfg.compute_dtype),
        "use_safetensors": True,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(cfg.compute_dtype),
            # Module names match from the start of the path (bitsandbytes' rule): short names skip nothing.
            llm_int8_skip_modules=list(families.detect(path).skip_quantization),
        )
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if cfg.load_in_4bit:
        _fix_cpu_4bit(model)
    return model


def _fix_cpu_4bit(model) -> None:
    # On CPUs with AVX512-BF16, an inference pass repacks 4-bit weights and later gradients go wrong
    # (a known bitsandbytes CPU fault): turn the repacking off on every 4-bit layer.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(sft: SftConfig, target: str, family: families.Family = families.LLAVA) -> LoraConfig:
    """PEFT's LoRA config of one SFT trial (``sft``: the section at the trial's grid point)."""
    return LoraConfig(
        r=sft.lora_r,
        lora_alpha=sft.lora_alpha,
        lora_dropout=sft.lora_dropout,
        target_modules=target,
        modules_to_save=[family.projector] if sft.train_projector else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, config: LoraConfig, seed: int):
    """Wrap the model with a fresh LoRA adapter whose A matrices depend only on (seed, shapes).

    Seeding right before PEFT draws A means trials of the same rank start identical, so an average of
    their adapters starts from one point (the study's adapters did not).
    """
    model = for_training(model)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def for_training(model):
    """A 4-bit base made ready for adapter training (PEFT's k-bit preparation); any other model as it is."""
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def load_policy(
    base_dir: str | Path, cfg: ModelConfig, adapter_dir: str | Path | None = None, trainable=False
):
    """The base with an adapter (or none): to answer (``trainable=False``: eval mode, on the GPU when there is
    one, the adapter merged unless the base is 4-bit) or to train on (the adapter trainable; TRL's DPO adds its
    frozen ``ref`` copy itself)."""
    if trainable:
        return load_adapter(for_training(load_base(str(base_dir), cfg)), adapter_dir, trainable=True)
    model = load_base(str(base_dir), cfg, device_map="cuda" if torch.cuda.is_available() else None)
    if adapter_dir:
        model = load_adapter(model, adapter_dir)
        if not cfg.load_in_4bit:
            # Merged LoRA generates at the base model's speed; on a 4-bit base a merge would round it away.
            model = model.merge_and_unload()
    return model.eval()


def check_adapter(adapter_dir: str | Path) -> None:
    """Safetensors only: PEFT would otherwise fall back to a pickled .bin."""
    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise ModelLoadError(
            f"adapter '{adapter_dir}': no adapter_model.safetensors; only safetensors adapters are loaded "
            "(re-save it with save_pretrained(..., safe_serialization=True))"
        )


def load_adapter(base, adapter_dir: str | Path, trainable: bool = False, name: str = "default") -> PeftModel:
    """A PEFT adapter folder on top of ``base`` (a plain model, or a PeftModel that gains adapter ``name``)."""
    check_adapter(adapter_dir)
    if isinstance(base, PeftModel):
        base.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable)
        return base
    return PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=name, is_trainable=trainable)


@functools.cache
def image_only(cls):
    """``cls`` (a processor class) without its video processor, which transformers builds only with torchvision
    (huggingface/transformers#43986), absent on these CPU machines; one class per processor class."""
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _: list(attributes))})


def load_any_processor(path: str, trust_remote_code: bool = False):
    """``AutoProcessor``, or without torchvision, the same processor class minus its video processor.

    transformers builds video processors only with torchvision (huggingface/transformers#43986), which these
    CPU machines lack; a judge of single images needs none, so the class is loaded with its other parts.
    """
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.utils import is_torchvision_available

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError):
        if is_torchvision_available():
            raise
        cls = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(path))]
        processor = image_only(cls).from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return processor


def load_critic(path: str):
    """(model, processor) of any image-text-to-text checkpoint, bfloat16 on a GPU, float32 on CPU."""
    from transformers import AutoModelForImageTextToText

    check_source(path)
    cuda = torch.cuda.is_available()
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map="cuda" if cuda else None,
        use_safetensors=True,
    )
    return model.eval(), load_any_processor(path)
