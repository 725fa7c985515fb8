"""The numerical self-check of a soup, and ``make_soup``: combine, check, write, check the file.

``self_check`` compares the soup's dense ΔW with the intended Σ w_i s_i B_i A_i on a sample of modules,
with the scale read from the config that will be written; ``factor_mean_check`` checks the factor-mean
baseline against what it claims to be. ``make_soup`` is the stage's way to a soup on disk: it runs one
method, refuses (``SoupCheckError``) a soup whose self-check fails, writes it in float32 and reads the
file back to check it again, so a soup that fails either check is never left at its folder.
No base model is needed and neither ``peft`` nor ``ray`` is imported.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from vlm_posttrain.soup.adapters import Adapter, SoupResult, load_adapter, write_adapter
from vlm_posttrain.soup.methods import METHODS, _normalise_weights, delta_mean, delta_svd, factor_mean, greedy

DELTA_MEAN_TOL = 1e-5


# --------------------------------------------------------------------------- checking


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


# --------------------------------------------------------------------------- combine, check, write


class SoupCheckError(RuntimeError):
    """The soup failed its numeric self-check; nothing was written."""


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
