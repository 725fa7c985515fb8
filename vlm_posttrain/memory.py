"""How much GPU memory one SFT trial needs, and how many trials may share one card.

Ray's fractional ``gpu`` is a scheduling label only: two trials at 0.5 each both land on one card whatever
they allocate, and the second dies out of memory minutes later. So before any trial starts, the SFT driver
estimates a trial's peak from the model config, quantization, LoRA rank, batch size and sequence length
(image tokens included), and either picks the share (``resources.gpus_per_trial: auto``) or refuses a
fraction that would not fit, with the numbers in the message:

    est = estimate_trial_memory(config, load_in_4bit=True, lora_r=16, batch_size=4, seq_len=832)
    trials, fraction = plan_gpu_share(est["total"], card_bytes=80e9)  # LLaVA-7B: ~10.6 GB -> (6, 0.1666)
    check_gpu_fraction(0.5, est["total"], 80e9, max_concurrent=2)     # raises ValueError if it won't fit

The formula (bytes; ``T = batch_size * seq_len`` tokens, ``h``/``i`` the text model's hidden/MLP sizes,
``L`` its layers, ``r`` the LoRA rank) follows the path a trial takes: TRL's SFTTrainer with its defaults
(activation checkpointing on, chunked LM-head loss), PEFT LoRA on the language model's q/k/v/o/gate/up/down,
AdamW, bf16 autocast on CUDA:

- ``weights``: 4-bit: the language model's linear layers at NF4 with double quantization (0.516 B/param);
  everything else (CLIP tower, projector, embeddings, LM head, norms) at 4 B/param, because PEFT's
  ``prepare_model_for_kbit_training`` casts every bf16 parameter that is not 4-bit to float32.
  Otherwise every parameter at the compute dtype's size.
- ``lora_optimizer``: weight, gradient, Adam m and v per LoRA parameter: 16 B (PEFT keeps adapters in fp32),
  8 B under 4-bit (TRL casts QLoRA adapters to bf16); ``train_projector`` adds the projector's copy.
- ``activations``: what autograd keeps through the step. With checkpointing, each decoder layer's input
  (h·res per token), the final norm, the LM head's input and the frozen CLIP tower's checkpointed layers
  (TRL's ``enable_input_require_grads`` puts the tower in the graph). Without it, per token and layer: two
  RMSNorm inputs in fp32 (4h + 4 each), each LoRA target's input as lora_A sees it (plus its dropout mask:
  1 B on CUDA, an input-sized tensor on CPU), each lora_A output (r), SDPA's q, k, v, output and
  log-sum-exp, and the SwiGLU's gate, SiLU output and up projection (3i·res); ``res`` is the residual
  stream's dtype (fp32 under 4-bit, the embeddings being upcast). QLoRA on LLaVA-7B: 34h + 15i ≈ 305 KB.
- ``transient``: the largest short-lived block: one layer recomputed with its backward buffers
  (T·305 KB + T·(3i + 4h)·res for QLoRA on LLaVA-7B), or TRL's LM-head tile (≤4096 rows × 32768 columns,
  whatever the vocabulary) with the head's bf16 copy and the fp32 input gradient, or the CLIP hidden states.
- ``runtime``: per process on CUDA, the context, cuBLAS workspace and allocator slack that
  ``torch.cuda.max_memory_allocated`` does not see (an assumption: 0.75 GiB).

Other families (``vlm_posttrain.families``): an image's language-model tokens are at most LLaVA-OneVision's
10 anyres tiles of 729 or Qwen2-VL's max_pixels / (14 x 2)^2, capped at the sequence length (no kept example
has more), and a Qwen2-VL image runs 4 vision-tower tokens per language-model token (2 x 2 merge). The vision
towers are counted as CLIP-like (Qwen2.5-VL's gated MLP makes its tower ~0.17B parameters larger).

For LLaVA-1.5-7B in 4-bit, r=16, batch 4 x 2048 tokens (the study's worst case): weights 5.7 GB, adapters
0.3, activations 4.9, transient 4.1, runtime 0.8: 15.8 GB; 89 GB without checkpointing.

Checked against autograd's saved tensors and the allocator's peak on the tiny model on CPU
(``tests/test_memory.py``) and against ``torch.cuda.max_memory_allocated`` in ``benchmarks/gpu.py``.
This module imports neither ray nor a model: it reads shapes from the config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlm_posttrain.config import ExperimentConfig, SftConfig

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 codes (4 bit) + an 8-bit absmax per 64-weight block + an fp32 absmax per 256 blocks (double quant).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
RUNTIME_BYTES = int(0.75 * GIB)
DEFAULT_MARGIN = 0.1
# TRL's chunked log-prob kernel: tokens per tile and vocabulary columns per tile (trl.kernels.chunked_logprob).
LM_HEAD_TOKEN_CHUNK = 4096
LM_HEAD_VOCAB_CHUNK = 32768
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj")
MLP_IN_TARGETS = ("gate_proj", "up_proj")
TARGETS = (*ATTENTION_TARGETS, "o_proj", *MLP_IN_TARGETS, "down_proj")


@dataclass(frozen=True)
class Shape:
    """The sizes the estimate needs, read from a LLaVA-style config (CLIP-like tower + Llama-like LM)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    v_hidden: int
    v_intermediate: int
    v_layers: int
    v_channels: int
    v_patch: int
    v_image: int
    v_heads: int

    # Tokens one image becomes in the language model at most: 576 for LLaVA-1.5 ('default' drops CLS); for
    # LLaVA-OneVision its anyres tiles (up to 10 of 729); for Qwen2-VL its max_pixels. The estimate caps it at
    # the sequence length (no kept example has more image tokens than sft.max_length).
    image_tokens: int
    # Vision-tower tokens per language-model image token (Qwen2-VL merges 2 x 2 patches into one).
    v_merge_tokens: int = 1

    def vision_tokens(self, image_tokens: int) -> int:
        return image_tokens * self.v_merge_tokens + 1

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def _as_config(model_config: Any):
    if isinstance(model_config, dict):
        from transformers import AutoConfig

        data = dict(model_config)
        # A config.json may list only what differs from the defaults: let transformers fill the rest.
        return AutoConfig.for_model(data.pop("model_type", "llava"), **data)
    return model_config


def model_shape(model_config: Any) -> Shape:
    """A transformers LLaVA config (or its dict, as in config.json) as the sizes the estimate needs."""
    cfg = _as_config(model_config)
    text, vision = cfg.text_config, cfg.vision_config
    heads = text.num_attention_heads
    # Qwen2-VL's tower names its sizes differently and has no fixed input size.
    v_image = getattr(vision, "image_size", 0) or 0
    merge = getattr(vision, "spatial_merge_size", 1) or 1
    if v_image:
        tiles = 10 if str(getattr(cfg, "vision_aspect_ratio", "")).startswith("anyres") else 1
        image_tokens = tiles * (v_image // vision.patch_size) ** 2
    else:
        image_tokens = 12845056 // (vision.patch_size * merge) ** 2  # Qwen2-VL's default max_pixels
    return Shape(
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        tied=bool(getattr(text, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False)),
        v_hidden=vision.hidden_size,
        v_intermediate=vision.intermediate_size,
        v_layers=getattr(vision, "num_hidden_layers", None) or vision.depth,
        v_channels=getattr(vision, "num_channels", None) or getattr(vision, "in_channels", 3),
        v_patch=vision.patch_size,
        v_image=v_image,
        v_heads=getattr(vision, "num_attention_heads", None) or vision.num_heads,
        image_tokens=image_tokens,
        v_merge_tokens=merge**2,
    )


def param_counts(shape: Shape) -> dict[str, int]:
    """Parameters by part: the LM's quantizable linears, the rest of the LM, the vision tower, the projector."""
    h, vh, vi = shape.hidden, shape.v_hidden, shape.v_intermediate
    layer_linear = sum(a * b for a, b in shape.linear_dims().values())
    embed = shape.vocab * h
    lm_rest = embed * (1 if shape.tied else 2) + shape.layers * 2 * h + h  # embeddings, head, norms
    patches = (shape.v_image // shape.v_patch) ** 2 if shape.v_image else 0  # Qwen2-VL: rotary, no table
    v_layer = 4 * (vh * vh + vh) + 2 * vh * vi + vi + vh + 4 * vh  # attention, MLP, two LayerNorms
    vision = shape.v_channels * shape.v_patch**2 * vh + vh + (patches + 1) * vh + 4 * vh
    vision += shape.v_layers * v_layer
    projector = vh * h + h + h * h + h
    return {
        "language_linear": shape.layers * layer_linear,
        "language_other": lm_rest,
        "vision": vision,
        "projector": projector,
    }


def lora_targets(pattern: str) -> tuple[str, ...]:
    """Which decoder projections a PEFT target regex hits (PEFT full-matches a string against module names)."""
    hits = tuple(
        t for t in TARGETS if re.fullmatch(pattern, f"model.language_model.layers.0.{_parent(t)}.{t}")
    )
    if not hits:
        raise ValueError(
            f"lora target '{pattern}' matches none of the language model's projections {TARGETS}"
        )
    return hits


def _parent(target: str) -> str:
    return "mlp" if target in (*MLP_IN_TARGETS, "down_proj") else "self_attn"


@dataclass(frozen=True)
class _Dtypes:
    """Bytes per element of each kind of saved tensor, for one (quantization, compute dtype, device) setting."""

    res: int  # residual stream, norms' outputs, MLP activations
    act: int  # what SDPA and the base linears see (the autocast dtype on CUDA)
    lora: int  # LoRA weights, and so the LoRA inputs they save (TRL casts QLoRA adapters to bf16)
    lora_in: int  # the dtype LoRA's input is saved in
    mask: int  # a dropout mask element: bool on CUDA (fused kernel), the input's dtype on CPU
    autocast: bool

    @classmethod
    def of(cls, load_in_4bit: bool, compute_dtype: str, cuda: bool) -> _Dtypes:
        size = DTYPE_BYTES[compute_dtype]
        # Matches vlm_posttrain.sft.trainer_args: bf16 autocast only on CUDA with a bfloat16 compute dtype.
        autocast = cuda and compute_dtype == "bfloat16"
        res = 4 if (load_in_4bit or compute_dtype == "float32") else size  # 4-bit: embeddings upcast to fp32
        act = size if autocast else res
        lora = 2 if load_in_4bit else 4  # PEFT keeps adapters in fp32; TRL casts QLoRA adapters to bf16
        lora_in = act if autocast else lora
        return cls(res, act, lora, lora_in, 1 if cuda else lora_in, autocast)


def _layer_bytes_per_token(
    shape: Shape, targets: tuple[str, ...], r: int, dropout: bool, d: _Dtypes
) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    h, i = shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    dims = shape.linear_dims()
    norms = 2 * (4 * h + 4)
    if dropout:
        lora_in = sum(dims[t][0] * (d.lora_in + d.mask) for t in targets)
    elif d.lora_in == d.res and not d.autocast:
        # No dropout and no cast: the projections that read one tensor save it once.
        groups = [ATTENTION_TARGETS, ("o_proj",), MLP_IN_TARGETS, ("down_proj",)]
        lora_in = sum(dims[g[0]][0] * d.lora_in for g in groups if any(t in targets for t in g))
    else:
        lora_in = sum(dims[t][0] * d.lora_in for t in targets)  # one cast copy per consumer
    lora_mid = len(targets) * r * d.lora_in
    attention = 4 * q * d.act + 4 * shape.heads
    mlp = 3 * i * d.res
    return norms + lora_in + lora_mid + attention + mlp


def _vision_saved_per_image(shape: Shape, d: _Dtypes, checkpointing: bool) -> float:
    """What autograd keeps for one image of the frozen CLIP tower, which is in the graph although nothing in
    it trains: TRL (with activation checkpointing) and PEFT (on a non-quantized base) call transformers'
    ``enable_input_require_grads``, which in transformers 5 also hooks the vision tower's embeddings."""
    vh, vi = shape.v_hidden, shape.v_intermediate
    tokens = shape.vision_tokens(shape.image_tokens)
    ln = 4 if d.autocast else d.res  # autocast runs LayerNorm in fp32
    if checkpointing:
        layer = vh * d.res  # each checkpointed encoder layer keeps its input only
    else:
        layer = 2 * (vh * ln + 8) + 4 * vh * d.act + 4 * shape.v_heads + 2 * vi * d.act
    return tokens * (shape.v_layers * layer + vh * ln) + shape.image_tokens * shape.hidden * d.res


def estimate_trial_memory(
    model_config: Any,
    load_in_4bit: bool,
    lora_r: int,
    batch_size: int,
    seq_len: int,
    train_projector: bool = False,
    compute_dtype: str = "bfloat16",
    lora_dropout: float = 0.05,
    lora_target: str | None = None,
    device: str = "cuda",
    gradient_checkpointing: bool = True,
) -> dict[str, int]:
    """Peak memory of one SFT trial in bytes, by part (weights, lora_optimizer, activations, transient,
    runtime) and ``total``. ``seq_len`` is the longest padded sequence in a batch, image tokens included.

    ``gradient_checkpointing`` is TRL's default, which the project keeps; ``device="cpu"`` drops the CUDA
    runtime and autocast (the Trainer trains on CPU without autocast).
    """
    from vlm_posttrain.config import LORA_LANGUAGE_TARGET

    shape = model_shape(model_config)
    shape = dataclasses.replace(shape, image_tokens=min(shape.image_tokens, seq_len))
    params = param_counts(shape)
    cuda = device == "cuda"
    d = _Dtypes.of(load_in_4bit, compute_dtype, cuda)
    targets = lora_targets(lora_target or LORA_LANGUAGE_TARGET)
    tokens = batch_size * seq_len

    if load_in_4bit:
        weights = params["language_linear"] * NF4_BYTES
        weights += 4 * (params["language_other"] + params["vision"] + params["projector"])
    else:
        weights = DTYPE_BYTES[compute_dtype] * sum(params.values())
    lora_params = shape.layers * sum(lora_r * sum(shape.linear_dims()[t]) for t in targets)
    lora_optimizer = 4 * d.lora * lora_params  # weight, gradient, Adam m and v in the adapter's dtype
    projector_bytes = 4 if load_in_4bit else DTYPE_BYTES[compute_dtype]
    if train_projector:
        lora_optimizer += 4 * projector_bytes * params["projector"]

    layer = _layer_bytes_per_token(shape, targets, lora_r, lora_dropout > 0, d)
    # A checkpointed layer keeps its input and recomputes the rest, one layer at a time, in backward.
    per_token = shape.layers * (shape.hidden * d.res if gradient_checkpointing else layer)
    # Final norm, the LM head's saved input, and TRL's per-token log-sum-exp, entropy and target.
    per_token += (4 * shape.hidden + 4) + shape.hidden * d.res + 16
    activations = tokens * per_token + batch_size * seq_len * seq_len * 4  # + the 4-D attention mask
    if gradient_checkpointing or not load_in_4bit:
        activations += batch_size * _vision_saved_per_image(shape, d, gradient_checkpointing)
    if train_projector:
        activations += batch_size * shape.image_tokens * (shape.v_hidden + 2 * shape.hidden) * projector_bytes

    recompute = tokens * layer if gradient_checkpointing else 0
    parts = {
        "weights": int(weights),
        "lora_optimizer": int(lora_optimizer),
        "activations": int(activations),
        "transient": int(_transient_bytes(shape, batch_size, tokens, d, load_in_4bit, recompute, cuda)),
        "runtime": RUNTIME_BYTES if cuda else 0,
    }
    parts["total"] = sum(parts.values())
    parts["lora_params"] = int(lora_params)
    parts["tokens"] = tokens
    return parts


def _transient_bytes(
    shape: Shape, batch: int, tokens: int, d: _Dtypes, load_in_4bit: bool, recompute: float, cuda: bool
) -> int:
    """The largest short-lived block alive at the peak: TRL's LM-head tiles, the vision tower's kept hidden
    states, or one layer's backward (its recomputed activations and gradient buffers)."""
    h, i = shape.hidden, shape.intermediate
    rows = min(tokens, LM_HEAD_TOKEN_CHUNK)
    head_weight = 4 if load_in_4bit else d.res
    head_cast = shape.vocab * h * d.act if head_weight != d.act else 0
    # The kernel allocates a full rows x 32768 tile whatever the vocabulary; backward adds an fp32 input grad.
    lm_head = rows * LM_HEAD_VOCAB_CHUNK * d.act + head_cast + rows * h * d.act + tokens * h * 4
    if not cuda:
        # Without Triton the tile is folded by torch ops: about six fp32 tile-sized temporaries at once.
        lm_head += 6 * rows * min(shape.vocab, LM_HEAD_VOCAB_CHUNK) * 4
    vision = (shape.v_layers + 1) * batch * shape.vision_tokens(shape.image_tokens) * shape.v_hidden * d.res
    backward = recompute + tokens * (3 * i + 4 * h) * d.res
    return max(lm_head, vision, backward)


def plan_gpu_share(
    estimate_bytes: float, card_bytes: float, margin: float = DEFAULT_MARGIN, max_trials: int | None = None
) -> tuple[int, float]:
    """The most trials whose estimates fit one card with ``margin`` kept free, and the Ray fraction for them.

    ``max_trials`` caps the count (no point labelling a trial 1/40 of a GPU when only 2 ever run at once).
    Raises ValueError when not even one trial fits.
    """
    usable = card_bytes * (1 - margin)
    fit = int(usable // estimate_bytes) if estimate_bytes > 0 else 1
    if fit < 1:
        raise ValueError(
            f"one trial needs ~{estimate_bytes / 1e9:.1f} GB but the card offers {usable / 1e9:.1f} GB "
            f"({card_bytes / 1e9:.0f} GB less {margin:.0%} margin); lower sft.batch_size or sft.max_length, "
            "use model.load_in_4bit, or plan for a larger card (resources.gpu_memory_gb)"
        )
    trials = min(fit, max_trials) if max_trials else fit
    # Ray keeps 4 decimals: round down so that `trials` shares never sum above 1.
    return trials, math.floor(10_000 / trials) / 10_000


def trials_sharing(fraction: float, max_concurrent: int) -> int:
    """How many trials Ray may put on one card at once with this fraction (1 for whole GPUs)."""
    if fraction >= 1:
        return 1
    return max(1, min(int(1 / fraction + 1e-9), max_concurrent))


def check_gpu_fraction(
    fraction: float,
    estimate_bytes: float,
    card_bytes: float,
    max_concurrent: int = 1_000,
    margin: float = DEFAULT_MARGIN,
) -> int:
    """Refuse a fraction whose co-scheduled trials would not fit the card; returns how many may share it."""
    sharing = trials_sharing(fraction, max_concurrent)
    need, usable = sharing * estimate_bytes, card_bytes * (1 - margin)
    if need > usable:
        fit = int(usable // estimate_bytes)
        advice = f"use gpus_per_trial <= {1 / fit:.4g}" if fit >= 1 else "no share fits"
        raise ValueError(
            f"resources.gpus_per_trial={fraction:g} lets {sharing} trial(s) share one card: "
            f"{sharing} x ~{estimate_bytes / 1e9:.1f} GB = {need / 1e9:.1f} GB > {usable / 1e9:.1f} GB "
            f"usable ({card_bytes / 1e9:.0f} GB less {margin:.0%} margin); {advice}, lower "
            "sft.batch_size/sft.max_length, or set gpus_per_trial: auto"
        )
    return sharing


def grid_estimate(cfg: ExperimentConfig, model_config: Any) -> dict[str, int]:
    """The largest trial estimate over the SFT grid (rank, dropout and projector training may vary).

    The sequence length is ``sft.max_length``, the worst case: the SFT stage drops longer examples, and a
    batch is padded to its longest example, so no batch is longer.
    """
    estimates = [trial_estimate(cfg, model_config, trial) for trial in cfg.sft.trials()]
    return max(estimates, key=lambda e: e["total"])


def trial_estimate(
    cfg: ExperimentConfig, model_config: Any, trial: SftConfig, device: str = "cuda"
) -> dict[str, int]:
    """One trial's estimate (``trial``: one of ``cfg.sft.trials()``) at ``sft.max_length`` tokens."""
    return estimate_trial_memory(
        model_config,
        cfg.model.load_in_4bit,
        trial.lora_r,
        trial.batch_size,
        trial.max_length,
        train_projector=trial.train_projector,
        compute_dtype=cfg.model.compute_dtype,
        lora_dropout=trial.lora_dropout,
        lora_target=cfg.model.lora_target,
        device=device,
    )


def gpu_share(cfg: ExperimentConfig, model_config: Any) -> tuple[float, str]:
    """The ``gpu`` share to give each SFT trial, and a one-line account of the plan.

    ``auto`` picks the most trials whose estimates fit ``resources.gpu_memory_gb`` with the margin (at
    most the concurrency the grid can use); an explicit fraction is checked and refused (ValueError, with
    the numbers) when the trials Ray would co-schedule on one card do not fit. 0 (CPU-only) is returned as is.
    """
    res = cfg.resources
    if res.gpus_per_trial == 0:
        return 0.0, ""
    est = grid_estimate(cfg, model_config)
    card = res.gpu_memory_gb * 1e9
    concurrent = min(res.max_concurrent_trials, len(cfg.sft.trials()))
    where = (
        f"~{est['total'] / 1e9:.1f} GB per trial (batch {cfg.sft.batch_size} x {cfg.sft.max_length} tokens, "
        f"weights {est['weights'] / 1e9:.1f}, activations {(est['activations'] + est['transient']) / 1e9:.1f})"
    )
    if res.gpus_per_trial == "auto":
        trials, fraction = plan_gpu_share(est["total"], card, max_trials=concurrent)
        return (
            fraction,
            f"gpus_per_trial auto -> {fraction:g}: {trials} trial(s) per {res.gpu_memory_gb:g} GB card, {where}",
        )
    fraction = float(res.gpus_per_trial)
    sharing = check_gpu_fraction(fraction, est["total"], card, max_concurrent=concurrent)
    return (
        fraction,
        f"gpus_per_trial {fraction:g}: {sharing} trial(s) per {res.gpu_memory_gb:g} GB card fit, {where}",
    )
