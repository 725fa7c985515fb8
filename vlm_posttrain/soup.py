"""Exact averaging ("soup") of PEFT LoRA adapters, working on the adapter folders alone.

Each adapter changes a weight by ΔW_i = s_i·B_i·A_i with s_i = alpha_i / r_i (per module, honouring
``rank_pattern`` / ``alpha_pattern``). Averaging A's and B's separately ("factor mean") is NOT the mean
of the ΔW_i: it adds cross terms B_i·A_j that nobody trained. Here the mean is exact:

* ``delta_mean``: concatenate the factors, A = [w_1 s_1 A_1; ...; w_n s_n A_n], B = [B_1 ... B_n],
  written with r = lora_alpha = Σr_i (scale 1). Exact up to float32 storage.
* ``delta_svd``: the same mean truncated per module to a chosen rank by SVD, with the truncation
  error recorded.
* ``factor_mean``: the factor-mean baseline, kept only as a labelled comparison.
* ``greedy``: greedy soup (Wortsman et al. 2022) over candidates with their validation metrics.

Usage::

    from vlm_posttrain.soup import load_adapter, delta_mean, self_check, write_adapter

    adapters = [load_adapter(p) for p in ["runs/a/adapter", "runs/b/adapter"]]
    soup = delta_mean(adapters)                   # or delta_svd(adapters, rank=16)
    assert self_check(soup, adapters)["passed"]
    write_adapter(soup, "runs/soup/adapter")      # then PeftModel.from_pretrained(base, that folder)

The stage entry points pick the ingredients from the SFT trial table and refuse to write a soup whose
self-check fails::

    chosen = select_adapters(trials, "best_rank", rank_metric="best")
    path, report = make_soup([load_adapter(sft_dir / row["adapter"]) for row in chosen.rows], "delta_mean", out)

No base model is needed and neither ``peft`` nor ``ray`` is imported.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    import pandas as pd

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "soup_manifest.json"
KEY_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
DELTA_MEAN_TOL = 1e-5
# The trial table's validation metric (loss of the checkpoint each trial kept: lower is better) and rank column.
METRIC = "best_eval_loss"
RANK_COLUMN = "config/lora_r"
METHODS = ("delta_mean", "delta_svd", "factor_mean", "greedy")

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


# --------------------------------------------------------------------------- checks shared by the soups


def _check_compatible(adapters: Sequence[Adapter]) -> None:
    if not adapters:
        raise ValueError("no adapters selected: the soup needs at least one ingredient")
    first = adapters[0]
    for other in adapters[1:]:
        _check_same_modules(first, other)
        _check_same_extra(first, other)
        if bool(first.config.get("fan_in_fan_out")) != bool(other.config.get("fan_in_fan_out")):
            raise ValueError(
                f"{first.path} and {other.path} differ in fan_in_fan_out; they target different layers"
            )
    bases = {a.config.get("base_model_name_or_path") for a in adapters} - {None, ""}
    if len(bases) > 1:
        warnings.warn(
            f"ingredients name different base models {sorted(bases)}; souping assumes one base", stacklevel=3
        )


def _check_same_modules(first: Adapter, other: Adapter) -> None:
    if first.modules.keys() != other.modules.keys():
        only = sorted(first.modules.keys() ^ other.modules.keys())[0]
        owner, lacks = (first, other) if only in first.modules else (other, first)
        raise ValueError(
            f"adapters target different modules: {owner.path} has {only} but {lacks.path} does not; "
            "soup only adapters trained with the same target_modules"
        )
    for name, (a, b) in first.modules.items():
        a2, b2 = other.modules[name]
        if a.shape[1] != a2.shape[1] or b.shape[0] != b2.shape[0]:
            raise ValueError(
                f"module {name}: {first.path} maps {a.shape[1]}->{b.shape[0]} but {other.path} maps "
                f"{a2.shape[1]}->{b2.shape[0]}; the adapters were trained on different base models"
            )


def _check_same_extra(first: Adapter, other: Adapter) -> None:
    # modules_to_save tensors are full weights, not low-rank changes: carrying them is exact only when
    # every ingredient has the very same ones.
    keys = sorted(first.extra.keys() | other.extra.keys())
    for key in keys:
        x, y = first.extra.get(key), other.extra.get(key)
        if x is None or y is None or x.shape != y.shape or not torch.equal(x, y):
            raise ValueError(
                f"{first.path} and {other.path} differ in the non-LoRA tensor {key} (modules_to_save); "
                "souping cannot average full weights exactly: retrain without modules_to_save"
            )


def _normalise_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if weights is None:
        return tuple(1.0 / n for _ in range(n))
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} adapters; pass one weight per adapter")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights {weights} must be finite and non-negative")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights {weights} sum to {total}; at least one must be positive")
    return tuple(w / total for w in weights)


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


def _result(
    method: str,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    tensors: dict[str, Factors],
    config: dict,
    metrics: dict | None = None,
) -> SoupResult:
    dtypes = {a.dtype for a in adapters}
    return SoupResult(
        method=method,
        tensors=tensors,
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        config=config,
        ingredients=tuple(str(a.path) for a in adapters),
        weights=tuple(weights),
        metrics=metrics or {},
        dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
        extra=dict(adapters[0].extra),
    )


# --------------------------------------------------------------------------- soups


def _concat(
    adapters: Sequence[Adapter], weights: Sequence[float], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of Σ w_i s_i B_i A_i for one module, float64, rank Σr_i over the non-zero weights."""
    used = [(a, w) for a, w in zip(adapters, weights, strict=True) if w > 0]
    a_cat = torch.cat([w * a.scales[name] * a.modules[name][0].double() for a, w in used], dim=0)
    b_cat = torch.cat([a.modules[name][1].double() for a, _ in used], dim=1)
    return a_cat, b_cat


def delta_mean(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> SoupResult:
    """Exact weighted mean of the adapters' ΔW, at rank Σr_i, written with r = lora_alpha = Σr_i."""
    _check_compatible(adapters)
    w = _normalise_weights(weights, len(adapters))
    tensors = {}
    for name in adapters[0].modules:
        a_cat, b_cat = _concat(adapters, w, name)
        tensors[name] = (a_cat.float(), b_cat.float())
    config = _soup_config(adapters[0].config, {n: a.shape[0] for n, (a, _) in tensors.items()})
    return _result("delta_mean", adapters, w, tensors, config)


def _truncate(
    a_cat: torch.Tensor, b_cat: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-`rank` SVD of B·A from QRs of the factors; returns (A_k, B_k, squared error, squared norm)."""
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(rank, s.numel())
    # Split sqrt(S) between the factors so A and B have comparable norms (better conditioned in float32
    # and a sane starting point if the soup is trained further).
    root = s[:k].sqrt()
    b_k = (q_b @ u[:, :k]) * root
    a_k = root[:, None] * (vh[:k] @ q_a.T)
    if k < rank:  # fewer singular values than asked for: pad with zeros, still exact
        a_k = torch.cat([a_k, a_k.new_zeros(rank - k, a_k.shape[1])])
        b_k = torch.cat([b_k, b_k.new_zeros(b_k.shape[0], rank - k)], dim=1)
    return a_k, b_k, float((s[k:] ** 2).sum()), float((s**2).sum())


def delta_svd(adapters: Sequence[Adapter], rank: int, weights: Sequence[float] | None = None) -> SoupResult:
    """The delta_mean soup truncated to `rank` per module by SVD; records relative Frobenius truncation errors."""
    _check_compatible(adapters)
    w = _normalise_weights(weights, len(adapters))
    max_total = max(
        sum(a.modules[n][0].shape[0] for a, wi in zip(adapters, w, strict=True) if wi > 0)
        for n in adapters[0].modules
    )
    if not 1 <= rank <= max_total:
        raise ValueError(f"rank {rank} must be between 1 and Σr = {max_total}; at Σr use delta_mean (exact)")
    tensors, errors, sq_err, sq_norm = {}, {}, 0.0, 0.0
    for name in adapters[0].modules:
        a_k, b_k, err2, norm2 = _truncate(*_concat(adapters, w, name), rank)
        tensors[name] = (a_k.float(), b_k.float())
        errors[name] = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
        sq_err, sq_norm = sq_err + err2, sq_norm + norm2
    config = _soup_config(adapters[0].config, {n: rank for n in tensors})
    metrics = {
        "truncation_rel_error": math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0,
        "truncation_rel_error_per_module": errors,
    }
    return _result("delta_svd", adapters, w, tensors, config, metrics)


def factor_mean(adapters: Sequence[Adapter]) -> SoupResult:
    """BASELINE ONLY (the published study's method): mean of A's and of B's, served with the first run's alpha/r.

    This is not the mean of the ΔW_i: it adds cross terms B_i·A_j and rescales by the first run's alpha.
    """
    _check_compatible(adapters)
    first = adapters[0]
    for other in adapters[1:]:
        for name, (a, _) in first.modules.items():
            if other.modules[name][0].shape[0] != a.shape[0]:
                raise ValueError(
                    f"factor_mean needs equal ranks: module {name} has r={a.shape[0]} in {first.path} and "
                    f"r={other.modules[name][0].shape[0]} in {other.path}; use delta_mean instead"
                )
    if len({tuple(sorted(a.scales.items())) for a in adapters}) > 1:
        warnings.warn(
            "factor_mean: ingredients have different alpha/r; the first adapter's alpha is used", stacklevel=2
        )
    n = len(adapters)
    tensors = {
        name: tuple(
            torch.stack([a.modules[name][i].double() for a in adapters]).mean(0).float() for i in (0, 1)
        )
        for name in first.modules
    }
    return _result("factor_mean", adapters, [1.0 / n] * n, tensors, copy.deepcopy(first.config))


def greedy(
    candidates: Sequence[tuple[Adapter, float]],
    evaluate: Callable[[SoupResult], float],
    lower_is_better: bool = True,
) -> tuple[SoupResult, list[dict]]:
    """Greedy soup: best candidate first, add each next one to the uniform delta_mean soup only if not worse.

    Returns the final soup and one step per candidate (path, own metric, soup metric with it, kept) for a manifest.
    """
    if not candidates:
        raise ValueError("no candidates selected: greedy soup needs at least one (adapter, metric) pair")
    if any(not math.isfinite(float(m)) for _, m in candidates):
        raise ValueError(f"candidate metrics {[m for _, m in candidates]} must be finite")
    ordered = sorted(candidates, key=lambda c: float(c[1]), reverse=not lower_is_better)

    def not_worse(new: float, old: float) -> bool:  # NaN compares False, so a NaN score is never kept
        return new <= old if lower_is_better else new >= old

    kept = [ordered[0][0]]
    soup = delta_mean(kept)
    score = float(evaluate(soup))
    steps = [{"path": str(kept[0].path), "metric": float(ordered[0][1]), "soup_metric": score, "kept": True}]
    for adapter, metric in ordered[1:]:
        trial = delta_mean([*kept, adapter])
        trial_score = float(evaluate(trial))
        keep = not_worse(trial_score, score)
        steps.append(
            {"path": str(adapter.path), "metric": float(metric), "soup_metric": trial_score, "kept": keep}
        )
        if keep:
            kept, soup, score = [*kept, adapter], trial, trial_score
    return soup, steps


# --------------------------------------------------------------------------- checking and writing


def _intended(adapters: Sequence[Adapter], weights: Sequence[float], name: str) -> torch.Tensor:
    terms = [
        w * ad.scales[name] * (ad.modules[name][1].double() @ ad.modules[name][0].double())
        for ad, w in zip(adapters, weights, strict=True)
    ]
    return torch.stack(terms).sum(0)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    norm = float(torch.linalg.norm(want))
    diff = float(torch.linalg.norm(got - want))
    return diff / norm if norm > 0 else diff


def _sample_modules(result: SoupResult, n_modules: int, seed: int) -> list[str]:
    names = sorted(result.tensors)
    return sorted(random.Random(seed).sample(names, min(n_modules, len(names))))


def self_check(
    result: SoupResult,
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    n_modules: int = 8,
    seed: int = 0,
) -> dict:
    """Compare the soup's dense ΔW with Σ w_i s_i B_i A_i on a sample of modules (scale read from the written config).

    passed: delta_mean within 1e-5; delta_svd within 1e-5 of its recorded truncation error; factor_mean is
    reported against the true mean and passes only if it happens to equal it. Also checks that the
    delta_mean soup of the first adapter alone equals that adapter.
    """
    w = _normalise_weights(weights if weights is not None else result.weights, len(adapters))
    sample = _sample_modules(result, n_modules, seed)
    errors = {name: _rel_error(result.delta(name), _intended(adapters, w, name)) for name in sample}
    if result.method == "delta_svd":
        recorded = result.metrics["truncation_rel_error_per_module"]
        deviation = max(abs(errors[n] - recorded[n]) for n in sample)
    else:
        deviation = max(errors.values())
    alone = delta_mean(adapters[:1])
    single = max(_rel_error(alone.delta(n), _intended(adapters[:1], [1.0], n)) for n in sample)
    return {
        "method": result.method,
        "modules_checked": len(sample),
        "max_rel_error": max(errors.values()),
        "max_deviation": deviation,
        "single_ingredient_rel_error": single,
        "passed": deviation < DELTA_MEAN_TOL and single < DELTA_MEAN_TOL,
    }


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
    """Write a folder PeftModel.from_pretrained(base, out_dir) loads, plus soup_manifest.json; refuses existing out_dir.

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
        (tmp / MANIFEST_NAME).write_text(json.dumps(_manifest(result), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------- the stage: choose, soup, check, write


class SoupCheckError(RuntimeError):
    """The soup failed its numeric self-check; nothing was written."""


@dataclass(frozen=True)
class Selection:
    """The SFT trials chosen as ingredients (best validation metric first) and how they were chosen."""

    rows: list[dict]
    detail: dict


def _require_columns(table: pd.DataFrame, columns: Sequence[str], why: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(
            f"the trial table lacks column(s) {missing} needed {why}; is it an SFT stage's trials.parquet?"
        )


def select_adapters(table: pd.DataFrame, select: str, top_k: int = 1, rank_metric: str = "best") -> Selection:
    """Choose ingredients from the SFT trial table: ``all``, ``top_k`` by METRIC, or the ``best_rank`` group.

    best_rank groups trials by RANK_COLUMN and takes the group whose best (or mean) METRIC is lowest;
    ties go to the smaller rank. Rows come back sorted by METRIC (lowest first, then trial id).
    """
    _require_columns(table, ("trial_id", "adapter", METRIC), "to pick soup ingredients")
    if table.empty:
        raise ValueError("the trial table has no rows: the SFT stage produced no adapters to soup")
    ordered = table.sort_values([METRIC, "trial_id"], na_position="last", kind="stable")
    detail: dict = {"select": select, "metric": METRIC, "lower_is_better": True}
    if select == "all":
        chosen = ordered
    else:
        scored = ordered[ordered[METRIC].notna()]
        if scored.empty:
            raise ValueError(
                f"no trial has a {METRIC}; cannot rank trials (did the SFT grid evaluate on val?)"
            )
        if select == "top_k":
            if top_k > len(scored):
                raise ValueError(
                    f"soup.top_k={top_k} but only {len(scored)} trial(s) have a {METRIC}; lower soup.top_k"
                )
            chosen = scored.head(top_k)
            detail["top_k"] = top_k
        elif select == "best_rank":
            chosen, groups = _best_rank_group(scored, rank_metric)
            detail.update(rank_metric=rank_metric, rank=int(chosen[RANK_COLUMN].iloc[0]), rank_scores=groups)
        else:
            raise ValueError(f"select '{select}': unknown; choose all, top_k or best_rank")
    return Selection(rows=chosen.to_dict("records"), detail=detail)


def _best_rank_group(scored: pd.DataFrame, rank_metric: str) -> tuple[pd.DataFrame, dict]:
    _require_columns(scored, (RANK_COLUMN,), "to group trials by LoRA rank (select: best_rank)")
    if rank_metric not in ("best", "mean"):
        raise ValueError(f"rank_metric '{rank_metric}': unknown; choose best or mean")
    groups = scored.groupby(RANK_COLUMN)[METRIC].agg("min" if rank_metric == "best" else "mean")
    rank = groups.idxmin()  # groupby sorts the ranks, so a tie goes to the smaller one
    return scored[scored[RANK_COLUMN] == rank], {str(int(r)): float(v) for r, v in groups.items()}


def factor_mean_check(
    result: SoupResult, adapters: Sequence[Adapter], n_modules: int = 8, seed: int = 0
) -> dict:
    """factor_mean's own check: its ΔW is s_1·mean(B)·mean(A), what the study served.

    Its distance from the true mean of the ΔW is reported (``max_rel_error``), not judged: that gap is
    what the baseline is there to show.
    """
    truth = self_check(result, adapters, n_modules=n_modules, seed=seed)
    deviation = 0.0
    for name in _sample_modules(result, n_modules, seed):
        a = torch.stack([ad.modules[name][0].double() for ad in adapters]).mean(0)
        b = torch.stack([ad.modules[name][1].double() for ad in adapters]).mean(0)
        deviation = max(deviation, _rel_error(result.delta(name), adapters[0].scales[name] * (b @ a)))
    passed = deviation < DELTA_MEAN_TOL and truth["single_ingredient_rel_error"] < DELTA_MEAN_TOL
    return {**truth, "intended": "s_1 * mean(B) @ mean(A)", "max_deviation": deviation, "passed": passed}


def _check_written(result: SoupResult, path: Path, n_modules: int = 8, seed: int = 0) -> float:
    """Relative error between the ΔW PEFT will read back from `path` and the soup in memory."""
    back = load_adapter(path)
    errors = []
    for name in _sample_modules(result, n_modules, seed):
        a, b = back.modules[name]
        errors.append(_rel_error(back.scales[name] * (b.double() @ a.double()), result.delta(name)))
    return max(errors)


def _combine(
    adapters: Sequence[Adapter],
    method: str,
    metrics: Sequence[float] | None,
    svd_rank: int,
    evaluate: Callable[[SoupResult], float] | None,
) -> tuple[SoupResult, list[Adapter], list[dict] | None]:
    """Run one method; returns the soup, the adapters actually in it, and greedy's steps."""
    if method == "delta_mean":
        return delta_mean(adapters), list(adapters), None
    if method == "delta_svd":
        return delta_svd(adapters, svd_rank), list(adapters), None
    if method == "factor_mean":
        return factor_mean(adapters), list(adapters), None
    if method == "greedy":
        if evaluate is None or metrics is None:
            raise ValueError("greedy needs each candidate's metric and an evaluate(soup) -> validation loss")
        result, steps = greedy(list(zip(adapters, metrics, strict=True)), evaluate)
        by_path = {str(a.path): a for a in adapters}
        return result, [by_path[p] for p in result.ingredients], steps
    raise ValueError(f"soup method '{method}': unknown; choose one of {', '.join(METHODS)}")


def make_soup(
    adapters: Sequence[Adapter],
    method: str,
    out_dir: str | os.PathLike,
    metrics: Sequence[float] | None = None,
    svd_rank: int = 0,
    evaluate: Callable[[SoupResult], float] | None = None,
) -> tuple[Path, dict]:
    """Combine, self-check, write `out_dir` (float32, whatever the ingredients' dtype) and check the file.

    Raises SoupCheckError, leaving nothing at `out_dir`, when either the soup in memory or the written
    file differs from the intended combination. Returns the folder and a report for the manifest.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; pick a new folder or remove it first")
    result, used, steps = _combine(adapters, method, metrics, svd_rank, evaluate)
    check = factor_mean_check(result, used) if method == "factor_mean" else self_check(result, used)
    if not check["passed"]:
        raise SoupCheckError(f"{method} soup failed its self-check, nothing written: {check}")
    result = replace(result, metrics={**result.metrics, "self_check": check})
    # float32 always: bf16 storage of the scaled, concatenated factors alone is off by ~1e-3.
    staged = out_dir.with_name(f".{out_dir.name}.unchecked-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)  # left by a crash of this very process id, never anyone's work
    write_adapter(result, staged, dtype=torch.float32)
    check["written_rel_error"] = _check_written(result, staged)
    if not check["written_rel_error"] < DELTA_MEAN_TOL:
        shutil.rmtree(staged)
        raise SoupCheckError(f"the written {method} soup does not read back as computed, removed: {check}")
    os.rename(staged, out_dir)
    report = {
        "method": method,
        "r": result.r,
        "lora_alpha": result.alpha,
        "ingredients": [
            {"path": p, "weight": w} for p, w in zip(result.ingredients, result.weights, strict=True)
        ],
        "self_check": check,
        "metrics": {k: v for k, v in result.metrics.items() if k != "self_check"},
    }
    if steps is not None:
        report["greedy_steps"] = steps
    return out_dir, report
