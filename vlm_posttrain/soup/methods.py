"""The soup methods: combine LoRA adapters (``Adapter``) into one ``SoupResult``, on the factors alone.

Each adapter changes a weight by ΔW_i = s_i·B_i·A_i with s_i = alpha_i / r_i (per module, honouring
``rank_pattern`` / ``alpha_pattern``). Averaging A's and B's separately ("factor mean") is NOT the mean
of the ΔW_i: it adds cross terms B_i·A_j that nobody trained. Here the mean is exact:

* ``delta_mean``: concatenate the factors, A = [w_1 s_1 A_1; ...; w_n s_n A_n], B = [B_1 ... B_n],
  written with r = lora_alpha = Σr_i (scale 1). Exact up to float32 storage.
* ``delta_svd``: the same mean truncated per module to a chosen rank by SVD, with the truncation
  error recorded.
* ``factor_mean``: the factor-mean baseline, kept only as a labelled comparison.
* ``greedy``: greedy soup (Wortsman et al. 2022) over candidates with their validation metrics.

Before combining, every method checks that the ingredients fit together (same modules and shapes, same
non-LoRA tensors) and normalises the weights. No base model is needed and neither ``peft`` nor ``ray``
is imported.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence

import torch

from vlm_posttrain.soup.adapters import Adapter, Factors, SoupResult, _soup_config

METHODS = ("delta_mean", "delta_svd", "factor_mean", "greedy")


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
