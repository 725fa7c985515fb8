"""PEFT LoRA adapter folders: reading one (factors and per-module scales), writing a combined one.

``load_adapter`` reads ``adapter_config.json`` + ``adapter_model.safetensors`` into float32 factors
(A: r×in, B: out×r) and the scale s = alpha / r per module, honouring ``rank_pattern`` / ``alpha_pattern``
the way PEFT does, and refuses anything whose change is not Σ s·B·A per Linear module (rsLoRA, DoRA and
other variants, embedding/conv LoRA). ``write_adapter`` writes a ``SoupResult`` as a folder that
``PeftModel.from_pretrained(base, folder)`` loads, plus ``provenance.json``; ``_soup_config`` builds the
config PEFT will read for it. Imports neither ``peft`` nor ``ray``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm_posttrain.layout import ADAPTER_FILES, PROVENANCE

CONFIG_NAME, WEIGHTS_NAME = ADAPTER_FILES
KEY_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"

# Config fields that switch PEFT to a LoRA variant whose forward is not W + s·B·A (peft 0.21
# LoraConfig fields tagged is_lora_variant, plus QA-LoRA and biased LoRA).
_VARIANT_FIELDS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "lora_bias",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
    "target_parameters",
    "trainable_token_indices",
)

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter read from disk: float32 factors (A: r×in, B: out×r) and the scale alpha/r per module."""

    path: Path
    config: dict
    modules: dict[str, Factors]
    scales: dict[str, float]
    dtype: torch.dtype
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class SoupResult:
    """A combined adapter ready to write: factors per module, the config PEFT will read, and provenance."""

    method: str
    tensors: dict[str, Factors]
    r: int
    alpha: float
    config: dict
    ingredients: tuple[str, ...]
    weights: tuple[float, ...]
    metrics: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def scale(self, module: str) -> float:
        """The scale PEFT will apply to this module once the written config is loaded."""
        return _module_scale(self.config, module, self.tensors[module][0].shape[0])

    def delta(self, module: str) -> torch.Tensor:
        """This soup's dense ΔW for one module, in float64."""
        a, b = self.tensors[module]
        return self.scale(module) * (b.double() @ a.double())


# --------------------------------------------------------------------------- loading


def _pattern_key(patterns: Sequence[str], module: str) -> str | None:
    # Mirrors peft.utils.other.get_pattern_key so the scale we compute is the one PEFT applies.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = _pattern_key(list(rank_pattern), module)
    a_key = _pattern_key(list(alpha_pattern), module)
    r = rank_pattern[r_key] if r_key is not None else config["r"]
    alpha = alpha_pattern[a_key] if a_key is not None else config["lora_alpha"]
    return int(r), float(alpha)


def _module_scale(config: dict, module: str, rank: int) -> float:
    r, alpha = _module_rank_alpha(config, module)
    if r != rank:
        raise ValueError(
            f"module {module}: the config gives rank {r} but the tensors have rank {rank}; "
            "the adapter_config.json does not match adapter_model.safetensors"
        )
    return alpha / r


def _check_config(config: dict, path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type is {peft_type!r}, not 'LORA'; only LoRA adapters can be souped")
    missing = [key for key in ("r", "lora_alpha") if key not in config]
    if missing:
        raise ValueError(f"{path / CONFIG_NAME} lacks {missing}; it is not a complete LoRA adapter config")
    if config.get("use_rslora"):
        raise ValueError(
            f"rsLoRA adapters are not supported ({path} has use_rslora=true, scale alpha/sqrt(r)); "
            "merge or convert it to plain LoRA first"
        )
    for name in _VARIANT_FIELDS:
        if config.get(name):
            raise ValueError(
                f"{path}: {name}={config[name]!r} is a LoRA variant (DoRA etc.) whose change is not s·B·A; "
                "only plain LoRA adapters can be souped"
            )
    if config.get("init_lora_weights") == "mica":
        raise ValueError(f"{path}: init_lora_weights='mica' is a LoRA variant; only plain LoRA can be souped")


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, part in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            return (name[len(KEY_PREFIX) :] if name.startswith(KEY_PREFIX) else name), part
    return None


def _read_tensors(path: Path) -> tuple[dict[str, Factors], dict[str, torch.Tensor], torch.dtype]:
    raw = load_file(str(path / WEIGHTS_NAME))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        split = _split_key(key)
        if split is not None:
            parts.setdefault(split[0], {})[split[1]] = tensor
        elif "lora_" in key:
            raise ValueError(
                f"{path}: tensor {key} is not a Linear lora_A/lora_B weight (embedding/conv LoRA, DoRA "
                "magnitude or LoRA bias); only Linear LoRA adapters can be souped"
            )
        else:
            extra[key] = tensor
    modules = {}
    for name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"{path}: module {name} has only lora_{''.join(ab)}; the weights file is incomplete"
            )
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{path}: module {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected r×in and out×r"
            )
        modules[name] = (a.float(), b.float())
    dtypes = {t.dtype for ab in parts.values() for t in ab.values()}
    return modules, extra, dtypes.pop() if len(dtypes) == 1 else torch.float32


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter folder; refuse anything whose change is not Σ s·B·A per Linear module."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"adapter folder {path} does not exist; pass a folder written by save_pretrained"
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} has no {name}; save the adapter with save_pretrained(safe_serialization=True)"
            )
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON ({err}); re-save the adapter") from err
    _check_config(config, path)
    modules, extra, dtype = _read_tensors(path)
    if not modules:
        raise ValueError(f"{path}: {WEIGHTS_NAME} holds no lora_A/lora_B tensors; nothing to soup")
    scales = {name: _module_scale(config, name, a.shape[0]) for name, (a, _) in modules.items()}
    return Adapter(path=path, config=config, modules=modules, scales=scales, dtype=dtype, extra=extra)


# --------------------------------------------------------------------------- writing


def _soup_config(template: dict, ranks: dict[str, int]) -> dict:
    # Scale 1 everywhere (alpha == r). Modules whose total rank differs from the common one (ingredients
    # with rank_pattern) get per-module entries in rank_pattern/alpha_pattern. PEFT matches those keys as
    # regexes against name suffixes, so plain names (what PEFT itself writes) are ambiguous when one module
    # name is a dotted suffix of another; then fall back to anchored, escaped keys.
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = {name: r for name, r in sorted(ranks.items()) if r != common}
    config = copy.deepcopy(template)
    for keys in (odd, {f"^{re.escape(name)}": r for name, r in odd.items()}):
        config.update(r=common, lora_alpha=common, rank_pattern=dict(keys), alpha_pattern=dict(keys))
        if all(_module_rank_alpha(config, n) == (r, float(r)) for n, r in ranks.items()):
            return config
    raise AssertionError("unreachable: anchored rank_pattern keys match exactly one module each")


def _state_dict(result: SoupResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in result.tensors.items():
        out[KEY_PREFIX + name + A_SUFFIX] = a.to(dtype).contiguous()
        out[KEY_PREFIX + name + B_SUFFIX] = b.to(dtype).contiguous()
    out.update({k: v.contiguous() for k, v in result.extra.items()})
    return out


def _manifest(result: SoupResult) -> dict:
    return {
        "method": result.method,
        "r": result.r,
        "lora_alpha": result.alpha,
        "ingredients": [
            {"path": p, "weight": w} for p, w in zip(result.ingredients, result.weights, strict=True)
        ],
        "metrics": result.metrics,
    }


def write_adapter(result: SoupResult, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a folder PeftModel.from_pretrained(base, out_dir) loads, plus provenance.json; refuses existing out_dir.

    Tensors are stored in the ingredients' dtype unless `dtype` is given.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; pick a new folder or remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and rename, so a crash never leaves a half-written adapter.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(
            _state_dict(result, dtype or result.dtype), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"}
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(result.config, indent=2, sort_keys=True) + "\n")
        # What the soup is made of; the driver adds the stage, config and inputs to the same file.
        (tmp / PROVENANCE).write_text(json.dumps(_manifest(result), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
