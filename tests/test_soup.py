"""Tests for the soup stage (vlm_posttrain/soup/): the soup math on adapter files alone, then the stage around it.

First exact LoRA adapter averaging on fake adapter files (``soup.adapters``, ``soup.methods``,
``soup.check``); then selection (``soup.select``), real tiny-LLaVA adapters, refusal, and the Ray task
(``soup.stage``).

The real adapters are made with PEFT directly on the tiny LLaVA (no Tune): LoRA on the language model
through the config's regex, lora_B perturbed so every adapter really changes the model.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_soup.py -q
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_posttrain import modeling
from vlm_posttrain.config import (
    LORA_LANGUAGE_TARGET,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    RunConfig,
    SftConfig,
    SoupConfig,
)
from vlm_posttrain.soup import adapters as soup_adapters
from vlm_posttrain.soup import check as soup_check
from vlm_posttrain.soup.adapters import load_adapter, write_adapter
from vlm_posttrain.soup.check import SoupCheckError, make_soup, self_check
from vlm_posttrain.soup.methods import delta_mean, delta_svd, factor_mean, greedy
from vlm_posttrain.soup.select import METRIC, select_adapters
from vlm_posttrain.soup.stage import build_soup

# module name -> (in_features, out_features); deliberately non-square
SHAPES = {
    "model.layers.0.self_attn.q_proj": (24, 24),
    "model.layers.0.self_attn.v_proj": (24, 12),
    "model.layers.1.mlp.down_proj": (40, 24),
}


def write_fake_adapter(
    path: Path,
    r: int,
    alpha: float,
    shapes: dict = SHAPES,
    seed: int = 0,
    scale_b: float = 1.0,
    extra_config: dict | None = None,
    extra_tensors: dict | None = None,
) -> Path:
    """Write a PEFT-style LoRA adapter folder with random factors (B non-zero, unlike a fresh init)."""
    gen = torch.Generator().manual_seed(seed)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({name.split(".")[-1] for name in shapes}),
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        **(extra_config or {}),
    }
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        rank, _ = soup_adapters._module_rank_alpha(config, name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(
            rank, fan_in, generator=gen
        ) / math.sqrt(fan_in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = scale_b * torch.randn(
            fan_out, rank, generator=gen
        )
    tensors.update(extra_tensors or {})
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def true_delta(adapter, name: str) -> torch.Tensor:
    a, b = adapter.modules[name]
    return adapter.scales[name] * (b.double() @ a.double())


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def max_error(result, adapters, weights) -> float:
    return max(
        rel_error(result.delta(n), sum(w * true_delta(a, n) for a, w in zip(adapters, weights, strict=True)))
        for n in SHAPES
    )


@pytest.fixture
def three(tmp_path):
    """Three adapters with ranks 4, 8, 16 and alphas 16, 8, 16."""
    specs = [(4, 16), (8, 8), (16, 16)]
    return [
        load_adapter(write_fake_adapter(tmp_path / f"a{i}", r, al, seed=i)) for i, (r, al) in enumerate(specs)
    ]


def test_load_adapter_reads_factors_and_scales(three):
    a = three[1]
    assert set(a.modules) == set(SHAPES)
    A, B = a.modules["model.layers.0.self_attn.v_proj"]
    assert A.shape == (8, 24) and B.shape == (12, 8) and A.dtype == torch.float32
    assert a.scales["model.layers.0.self_attn.v_proj"] == pytest.approx(8 / 8)
    assert three[0].scales["model.layers.0.self_attn.q_proj"] == pytest.approx(16 / 4)


def test_load_adapter_honours_rank_and_alpha_pattern(tmp_path):
    cfg = {"rank_pattern": {"v_proj": 6}, "alpha_pattern": {"down_proj": 3}}
    a = load_adapter(write_fake_adapter(tmp_path / "p", 4, 8, extra_config=cfg))
    assert a.modules["model.layers.0.self_attn.v_proj"][0].shape[0] == 6
    assert a.scales["model.layers.0.self_attn.v_proj"] == pytest.approx(8 / 6)
    assert a.scales["model.layers.1.mlp.down_proj"] == pytest.approx(3 / 4)
    assert a.scales["model.layers.0.self_attn.q_proj"] == pytest.approx(8 / 4)


def test_delta_mean_is_exact_and_factor_mean_is_not(tmp_path):
    # equal ranks so factor_mean can run; different alphas (16, 8) so it also warns
    adapters = [
        load_adapter(write_fake_adapter(tmp_path / f"e{i}", 8, al, seed=i)) for i, al in enumerate((16, 8))
    ]
    exact = delta_mean(adapters)
    assert exact.r == exact.alpha == 16
    assert max_error(exact, adapters, [0.5, 0.5]) < 1e-5
    with pytest.warns(UserWarning, match="different alpha"):
        baseline = factor_mean(adapters)
    assert baseline.r == 8 and baseline.alpha == 16  # first run's r and alpha
    assert max_error(baseline, adapters, [0.5, 0.5]) > 0.3  # cross terms B_i·A_j
    check = self_check(baseline, adapters)
    assert check["max_rel_error"] > 0.3 and not check["passed"]


def test_delta_mean_mixed_ranks_and_weights(three):
    uniform = delta_mean(three)
    assert uniform.r == uniform.alpha == 4 + 8 + 16
    assert max_error(uniform, three, [1 / 3] * 3) < 1e-5
    weighted = delta_mean(three, weights=[3, 1, 0])  # normalised to 0.75, 0.25, 0
    assert weighted.weights == (0.75, 0.25, 0.0)
    assert weighted.r == 4 + 8  # a zero-weight ingredient adds no rank
    assert max_error(weighted, three, [0.75, 0.25, 0.0]) < 1e-5
    check = self_check(weighted, three)
    assert check["passed"] and check["modules_checked"] == len(SHAPES) and check["max_rel_error"] < 1e-5


def test_delta_mean_with_rank_pattern_writes_per_module_ranks(tmp_path):
    a = load_adapter(write_fake_adapter(tmp_path / "a", 4, 8, extra_config={"rank_pattern": {"v_proj": 6}}))
    b = load_adapter(write_fake_adapter(tmp_path / "b", 8, 16, seed=1))
    result = delta_mean([a, b])
    assert result.r == 12 and result.config["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 14}
    assert result.config["alpha_pattern"] == result.config["rank_pattern"]
    assert self_check(result, [a, b])["passed"]


def test_soup_config_anchors_pattern_keys_only_when_names_are_ambiguous():
    # PEFT matches rank_pattern keys as regexes on name suffixes: "encoder.fc" would also hit "vision.encoder.fc".
    plain = soup_adapters._soup_config({"r": 4, "lora_alpha": 4}, {"a.q": 8, "a.v": 4, "b.q": 8})
    assert plain["r"] == 8 and plain["rank_pattern"] == {"a.v": 4}
    ranks = {"encoder.fc": 8, "vision.encoder.fc": 4, "x.fc": 4}
    anchored = soup_adapters._soup_config({"r": 4, "lora_alpha": 4}, ranks)
    assert anchored["rank_pattern"] == {r"^encoder\.fc": 8}
    assert all(soup_adapters._module_rank_alpha(anchored, n) == (r, r) for n, r in ranks.items())


def test_delta_svd_full_rank_exact_and_low_rank_matches_dense_svd(three):
    full = delta_svd(three, rank=28)
    assert full.r == full.alpha == 28
    assert max_error(full, three, [1 / 3] * 3) < 1e-5
    assert full.metrics["truncation_rel_error"] < 1e-6

    low = delta_svd(three, rank=5)
    sq_err = sq_norm = 0.0
    for name in SHAPES:
        dense = sum(true_delta(a, name) for a in three) / 3
        s = torch.linalg.svdvals(dense)
        want = float(s[5:].norm() / s.norm())
        assert low.metrics["truncation_rel_error_per_module"][name] == pytest.approx(want, rel=1e-6)
        assert rel_error(low.delta(name), dense) == pytest.approx(want, rel=1e-4)
        sq_err, sq_norm = sq_err + float((s[5:] ** 2).sum()), sq_norm + float((s**2).sum())
    assert low.metrics["truncation_rel_error"] == pytest.approx(math.sqrt(sq_err / sq_norm), rel=1e-6)
    assert low.metrics["truncation_rel_error"] > 0.05
    assert self_check(low, three)["passed"]


def test_soup_of_one_adapter_equals_it(three):
    one = delta_mean(three[1:2])
    for name in SHAPES:
        assert rel_error(one.delta(name), true_delta(three[1], name)) < 1e-6
    assert self_check(one, three[1:2])["single_ingredient_rel_error"] < 1e-6


def test_greedy_keeps_helpful_and_drops_harmful(tmp_path):
    # Same seed and generator => same A and same direction of B, so ΔW = scale_b · ΔW_target exactly.
    target = load_adapter(write_fake_adapter(tmp_path / "target", 8, 16, seed=10))
    start = load_adapter(write_fake_adapter(tmp_path / "start", 8, 16, seed=10, scale_b=0.5))  # 0.5·T
    helpful = load_adapter(
        write_fake_adapter(tmp_path / "helpful", 8, 16, seed=10, scale_b=1.1)
    )  # soup 0.8·T
    harmful = load_adapter(write_fake_adapter(tmp_path / "harmful", 8, 16, seed=12, scale_b=50.0))

    def distance(result) -> float:
        return math.sqrt(sum(float((result.delta(n) - true_delta(target, n)).norm() ** 2) for n in SHAPES))

    candidates = [(harmful, 3.0), (helpful, 2.0), (start, 1.0)]
    result, steps = greedy(candidates, distance)
    assert [s["path"] for s in steps] == [str(start.path), str(helpful.path), str(harmful.path)]
    assert [s["kept"] for s in steps] == [True, True, False]
    assert result.ingredients == (str(start.path), str(helpful.path))
    assert steps[1]["soup_metric"] == pytest.approx(0.4 * steps[0]["soup_metric"], rel=1e-5)
    assert steps[2]["soup_metric"] > steps[1]["soup_metric"]

    flipped, flipped_steps = greedy(
        [(a, -m) for a, m in candidates], lambda r: -distance(r), lower_is_better=False
    )
    assert flipped.ingredients == result.ingredients
    assert [s["kept"] for s in flipped_steps] == [True, True, False]


def test_write_adapter_round_trip_and_refuses_existing(three, tmp_path):
    result = delta_mean(three)
    out = write_adapter(result, tmp_path / "soup")
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "provenance.json",
    }
    back = load_adapter(out)
    for name in SHAPES:
        assert rel_error(true_delta(back, name), result.delta(name)) < 1e-6
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 28 and config["rank_pattern"] == {}
    manifest = json.loads((out / "provenance.json").read_text())
    assert manifest["method"] == "delta_mean" and len(manifest["ingredients"]) == 3
    with pytest.raises(FileExistsError, match="already exists"):
        write_adapter(result, out)


def test_modules_to_save_identical_carried_different_refused(tmp_path):
    head = {"base_model.model.lm_head.weight": torch.ones(4, 3)}
    a = load_adapter(write_fake_adapter(tmp_path / "a", 4, 8, extra_tensors=head))
    b = load_adapter(write_fake_adapter(tmp_path / "b", 4, 8, seed=1, extra_tensors=head))
    assert torch.equal(
        delta_mean([a, b]).extra["base_model.model.lm_head.weight"], head["base_model.model.lm_head.weight"]
    )
    other = {"base_model.model.lm_head.weight": torch.zeros(4, 3)}
    c = load_adapter(write_fake_adapter(tmp_path / "c", 4, 8, seed=2, extra_tensors=other))
    with pytest.raises(ValueError, match="modules_to_save"):
        delta_mean([a, c])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"extra_config": {"use_rslora": True}}, ValueError, "rsLoRA adapters are not supported"),
        ({"extra_config": {"use_dora": True}}, ValueError, "use_dora"),
        ({"extra_config": {"peft_type": "IA3"}}, ValueError, "not 'LORA'"),
    ],
)
def test_load_adapter_refuses_unsupported(tmp_path, kwargs, error, match):
    path = write_fake_adapter(tmp_path / "bad", 4, 8, **kwargs)
    with pytest.raises(error, match=match) as info:
        load_adapter(path)
    assert str(path) in str(info.value)


def test_bad_inputs_raise_clear_errors(tmp_path, three):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(tmp_path / "half")
    fewer = dict(list(SHAPES.items())[:2])
    other = load_adapter(write_fake_adapter(tmp_path / "fewer", 4, 8, shapes=fewer))
    with pytest.raises(ValueError, match="different modules.*model.layers.1.mlp.down_proj"):
        delta_mean([three[0], other])
    wider = load_adapter(
        write_fake_adapter(
            tmp_path / "wider", 4, 8, shapes={**SHAPES, **{"model.layers.1.mlp.down_proj": (48, 24)}}
        )
    )
    with pytest.raises(ValueError, match="down_proj.*different base"):
        delta_mean([three[0], wider])
    with pytest.raises(ValueError, match="no adapters selected"):
        delta_mean([])
    with pytest.raises(ValueError, match="no candidates"):
        greedy([], lambda r: 0.0)
    with pytest.raises(ValueError, match="factor_mean needs equal ranks"):
        factor_mean(three)
    with pytest.raises(ValueError, match="non-negative"):
        delta_mean(three, weights=[1, -1, 1])
    with pytest.raises(ValueError, match="sum to"):
        delta_mean(three, weights=[0, 0, 0])
    with pytest.raises(ValueError, match="rank 29"):
        delta_svd(three, rank=29)


def test_soup_module_needs_no_ray_or_peft():
    import subprocess
    import sys

    code = (
        "import sys, vlm_posttrain.soup.adapters, vlm_posttrain.soup.methods, vlm_posttrain.soup.check, "
        "vlm_posttrain.soup.select; assert 'ray' not in sys.modules and 'peft' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_peft_loads_soup_and_matches_hand_merged_base(tmp_path):
    """End to end: two PEFT adapters (different r, alpha, one with rank_pattern) -> delta_mean -> PeftModel."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    base = LlamaForCausalLM(config).eval()
    specs = [
        {"r": 4, "lora_alpha": 16},
        {"r": 8, "lora_alpha": 8, "rank_pattern": {"v_proj": 6}},
    ]
    paths = []
    for i, spec in enumerate(specs):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj", "v_proj"], **spec))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        model.save_pretrained(tmp_path / f"run{i}")
        paths.append(tmp_path / f"run{i}")

    adapters = [load_adapter(p) for p in paths]
    result = delta_mean(adapters)
    assert result.r == 12 and set(result.config["rank_pattern"].values()) == {10}  # v_proj: 4 + 6
    assert self_check(result, adapters)["passed"]
    out = write_adapter(result, tmp_path / "soup")

    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in merged.named_modules():
            if name in adapters[0].modules:
                delta = sum(true_delta(a, name) for a in adapters) / len(adapters)
                module.weight += delta.float()
    souped = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        want, got, plain = merged(ids).logits, souped(ids).logits, base(ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the soup really changes the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the stage around the math

# name -> LoRA settings; seeds differ so the A matrices differ too (the exact mean must not rely on shared A)
SPECS = {
    "a": {"r": 4, "lora_alpha": 16, "seed": 1},
    "b": {"r": 4, "lora_alpha": 8, "seed": 2},
    "c": {"r": 2, "lora_alpha": 4, "seed": 3},
    "q_v_only": {"r": 4, "lora_alpha": 8, "seed": 4, "target": r".*language_model.*\.(q_proj|v_proj)"},
    "rslora": {"r": 4, "lora_alpha": 8, "seed": 5, "use_rslora": True},
}


def load_base(model_dir: Path):
    return modeling.load_base(str(model_dir), ModelConfig(name=str(model_dir))).eval()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("adapters")
    for name, spec in SPECS.items():
        lora = LoraConfig(
            r=spec["r"],
            lora_alpha=spec["lora_alpha"],
            target_modules=spec.get("target", LORA_LANGUAGE_TARGET),
            use_rslora=spec.get("use_rslora", False),
            task_type="CAUSAL_LM",
        )
        model = modeling.attach_lora(load_base(tiny_model_dir), lora, spec["seed"])
        gen = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:  # PEFT starts B at zero: no change at all without this
                    param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        model.save_pretrained(root / name)
    return {name: root / name for name in SPECS}


def fake_sft(root: Path, adapters: dict[str, Path], rows: list[tuple[str, str, float]], missing=()) -> Path:
    """An SFT artifact folder: trials.parquet + adapters/<trial_id>/ (rows: trial_id, adapter name, val loss)."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for trial_id, name, loss in rows:
        if trial_id not in missing:
            shutil.copytree(adapters[name], root / "adapters" / trial_id)
        config = json.loads((adapters[name] / "adapter_config.json").read_text())
        records.append(
            {
                "trial_id": trial_id,
                "config/lora_r": config["r"],
                "config/lora_alpha": config["lora_alpha"],
                "train_loss": loss,
                "eval_loss": loss,
                METRIC: loss,
                "epoch": 1.0,
                "time_total_s": 1.0,
                "adapter": f"adapters/{trial_id}",
            }
        )
    columns = ["trial_id", "config/lora_r", "config/lora_alpha", "eval_loss", METRIC, "adapter"]
    pd.DataFrame(records, columns=None if records else columns).to_parquet(root / "trials.parquet")
    return root


# --------------------------------------------------------------------------- config


def test_soup_config_loads_and_validates(tiny_config):
    cfg = tiny_config()
    assert cfg.soup.method == "delta_mean" and cfg.soup.select == "best_rank"
    with pytest.raises(ConfigError, match="soup.svd_rank: method delta_svd needs svd_rank > 0"):
        tiny_config(soup={"method": "delta_svd"})
    assert tiny_config(soup={"method": "delta_svd", "svd_rank": 4}).soup.svd_rank == 4
    with pytest.raises(ConfigError, match="soup.select: expected one of"):
        tiny_config(soup={"select": "best"})
    with pytest.raises(ConfigError, match="soup.top_k: must be >= 1"):
        tiny_config(soup={"top_k": 0})
    with pytest.raises(ConfigError, match="soup.alpha: unknown key"):
        tiny_config(soup={"alpha": 1})


# --------------------------------------------------------------------------- selection


@pytest.fixture
def table() -> pd.DataFrame:
    # r=4: best 1.0, mean 2.0; r=8: best 1.5, mean 1.55; r=16 never evaluated
    rows = [("t1", 4, 1.0), ("t2", 4, 3.0), ("t3", 8, 1.5), ("t4", 8, 1.6), ("t5", 16, math.nan)]
    return pd.DataFrame(
        [{"trial_id": t, "config/lora_r": r, METRIC: m, "adapter": f"adapters/{t}"} for t, r, m in rows]
    )


@pytest.mark.parametrize(
    ("select", "kwargs", "want", "rank"),
    [
        ("all", {}, ["t1", "t3", "t4", "t2", "t5"], None),
        ("top_k", {"top_k": 3}, ["t1", "t3", "t4"], None),
        ("best_rank", {"rank_metric": "best"}, ["t1", "t2"], 4),
        ("best_rank", {"rank_metric": "mean"}, ["t3", "t4"], 8),
    ],
)
def test_select_adapters(table, select, kwargs, want, rank):
    chosen = select_adapters(table.sample(frac=1, random_state=0), select, **kwargs)
    assert [row["trial_id"] for row in chosen.rows] == want
    assert chosen.detail["select"] == select and chosen.detail["metric"] == METRIC
    if rank is not None:
        assert chosen.detail["rank"] == rank
        assert set(chosen.detail["rank_scores"]) == {"4", "8"}


def test_select_adapters_errors(table):
    with pytest.raises(ValueError, match="no rows"):
        select_adapters(table.iloc[:0], "all")
    with pytest.raises(ValueError, match="top_k=5 but only 4"):
        select_adapters(table, "top_k", top_k=5)
    with pytest.raises(ValueError, match="config/lora_r"):
        select_adapters(table.drop(columns="config/lora_r"), "best_rank")
    with pytest.raises(ValueError, match="no trial has a best_eval_loss"):
        select_adapters(table.assign(**{METRIC: math.nan}), "top_k")
    with pytest.raises(ValueError, match="lacks column"):
        select_adapters(table.drop(columns="adapter"), "all")


# --------------------------------------------------------------------------- real tiny-LLaVA adapters


def collated_batch(model_dir: Path, data_dir: Path, n: int = 2) -> dict:
    """A real batch: the val split through the SFT stage's dataset and TRL's vision collator."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlm_posttrain.data import load_split
    from vlm_posttrain.sft import to_sft_dataset

    processor = modeling.load_processor(str(model_dir))
    dataset, _ = to_sft_dataset(load_split(data_dir, "val"), processor, 2048, "skip")
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    batch = collator([dataset[i] for i in range(n)])
    return {k: v for k, v in batch.items() if k != "labels"}


def test_soup_loads_with_peft_and_equals_hand_merged_mean(adapters, tiny_model_dir, tiny_data_dir, tmp_path):
    from peft import PeftModel

    ingredients = [load_adapter(adapters["a"]), load_adapter(adapters["b"])]  # alpha 16 and 8, both r=4
    path, report = make_soup(ingredients, "delta_mean", tmp_path / "soup")
    assert (
        report["r"] == 8 and report["self_check"]["passed"] and report["self_check"]["written_rel_error"] == 0
    )
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["target_modules"] == LORA_LANGUAGE_TARGET and config["r"] == config["lora_alpha"] == 8

    merged = load_base(tiny_model_dir)
    hits = 0
    with torch.no_grad():
        for name, module in merged.named_modules():
            if name in ingredients[0].modules:
                module.weight += (sum(true_delta(a, name) for a in ingredients) / 2).float()
                hits += 1
    assert hits == len(ingredients[0].modules) == 14  # 2 layers x 7 projections, none in the vision tower

    batch = collated_batch(tiny_model_dir, tiny_data_dir)
    souped = PeftModel.from_pretrained(load_base(tiny_model_dir), path).eval()
    with torch.no_grad():
        want, got = merged(**batch).logits, souped(**batch).logits
        plain = load_base(tiny_model_dir)(**batch).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the soup really changes the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_ingredients_give_an_exact_float32_soup(adapters, tmp_path):
    # QLoRA training stores bf16 adapters; bf16 storage of the scaled concatenated factors would miss 1e-5.
    paths = []
    for name in ("a", "c"):
        out = tmp_path / name
        shutil.copytree(adapters[name], out)
        weights = load_file(str(out / "adapter_model.safetensors"))
        save_file({k: v.bfloat16() for k, v in weights.items()}, str(out / "adapter_model.safetensors"))
        paths.append(out)
    path, report = make_soup([load_adapter(p) for p in paths], "delta_mean", tmp_path / "soup")
    assert report["r"] == 6 and report["self_check"]["passed"]
    assert {t.dtype for t in load_file(str(path / "adapter_model.safetensors")).values()} == {torch.float32}


def test_failed_self_check_writes_nothing(adapters, tmp_path, monkeypatch):
    ingredients = [load_adapter(adapters["a"]), load_adapter(adapters["b"])]
    real = soup_check.delta_mean

    def corrupted(adapters, weights=None):
        result = real(adapters, weights)
        name = sorted(result.tensors)[0]
        a, b = result.tensors[name]
        return soup_check.replace(result, tensors={**result.tensors, name: (a * 1.001, b)})

    monkeypatch.setattr(soup_check, "delta_mean", corrupted)
    with pytest.raises(SoupCheckError, match="failed its self-check, nothing written"):
        make_soup(ingredients, "delta_mean", tmp_path / "soup")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(soup_check, "delta_mean", real)
    monkeypatch.setattr(soup_check, "_check_written", lambda result, path: 1.0)  # the file reads back wrong
    with pytest.raises(SoupCheckError, match="does not read back"):
        make_soup(ingredients, "delta_mean", tmp_path / "soup")
    assert list(tmp_path.iterdir()) == []


def test_factor_mean_is_written_as_labelled_baseline(adapters, tmp_path):
    ingredients = [load_adapter(adapters["a"]), load_adapter(adapters["b"])]
    with pytest.warns(UserWarning, match="different alpha"):
        _, report = make_soup(ingredients, "factor_mean", tmp_path / "soup")
    check = report["self_check"]
    assert check["passed"] and check["max_deviation"] < 1e-6  # it is what it claims: s_1·mean(B)·mean(A)
    assert check["max_rel_error"] > 0.1  # and that is far from the mean of the ΔW


def _experiment(soup: SoupConfig, model: ModelConfig, sft: SftConfig | None = None) -> ExperimentConfig:
    data = DataConfig(source="synthetic", limit=1)
    return ExperimentConfig(RunConfig("soup-test"), model, data, sft=sft or SftConfig(), soup=soup)


@pytest.mark.parametrize(
    ("rows", "missing", "error", "match"),
    [
        ([("t1", "a", 1.0), ("t2", "b", 2.0)], ("t2",), FileNotFoundError, "adapters/t2 does not exist"),
        ([("t1", "a", 1.0), ("t2", "q_v_only", 2.0)], (), ValueError, "target different modules"),
        ([("t1", "a", 1.0), ("t2", "rslora", 2.0)], (), ValueError, "rsLoRA adapters are not supported"),
        ([], (), ValueError, "no rows"),
    ],
)
def test_bad_inputs_fail_clearly_before_loading_the_base(adapters, tmp_path, rows, missing, error, match):
    sft_dir = fake_sft(tmp_path / "sft", adapters, rows, missing)
    # A base folder that does not exist: these errors must come from the adapter files alone.
    with pytest.raises(error, match=match):
        build_soup(
            _experiment(SoupConfig(select="all"), ModelConfig(name="nowhere")),
            tmp_path / "no-base",
            tmp_path / "no-data",
            sft_dir,
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_greedy_with_real_val_loss(adapters, tiny_model_dir, tiny_data_dir, tmp_path):
    sft_dir = fake_sft(tmp_path / "sft", adapters, [("t1", "a", 1.0), ("t2", "c", 2.0)])
    model_cfg = ModelConfig(name=str(tiny_model_dir))
    out = build_soup(
        _experiment(SoupConfig(method="greedy", select="all"), model_cfg, SftConfig(batch_size=4)),
        tiny_model_dir,
        tiny_data_dir,
        sft_dir,
        tmp_path / "soup",
    )
    steps = out["greedy_steps"]
    assert [s["trial_id"] for s in steps] == ["t1", "t2"] and steps[0]["kept"]
    alone = {c["trial_id"]: c["eval_loss_recomputed"] for c in out["candidates"]}
    assert steps[0]["soup_metric"] == pytest.approx(alone["t1"], abs=1e-6)  # a soup of one is that adapter
    kept = [s for s in steps if s["kept"]]
    assert [i["trial_id"] for i in out["ingredients"]] == [s["trial_id"] for s in kept]
    assert out["eval_loss"] == pytest.approx(kept[-1]["soup_metric"], abs=1e-6)
    assert out["self_check"]["passed"] and (tmp_path / "soup" / "adapter_config.json").is_file()


# --------------------------------------------------------------------------- the driver, through a real Ray task


@pytest.mark.slow  # ~30 s: starting Ray, then a fresh worker importing torch/transformers/trl
def test_driver_runs_the_soup_as_a_ray_task(adapters, tiny_model_dir, tiny_data_dir, tiny_config, local_ray):
    import ray

    from ray_jobs import soup as soup_job
    from vlm_posttrain.store import RunStore

    cfg = tiny_config()
    store = RunStore(cfg.run.root)
    rows = [("t1", "a", 0.9), ("t2", "b", 1.2), ("t3", "c", 1.0)]  # r=4 {t1, t2} has the best trial
    sft_dir = fake_sft(Path(store.artifact_path("sft", "fake")), adapters, rows)
    path = soup_job.run(cfg, store, str(tiny_model_dir), str(tiny_data_dir), str(sft_dir))
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    gcs = ray.get_runtime_context().gcs_address
    # tests/conftest.py pins every Ray a test starts to loopback (without it: the machine's address).
    assert addresses == {"127.0.0.1"} and gcs.startswith("127.0.0.1:"), (addresses, gcs)

    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["selection"]["rank"] == 4
    assert [i["trial_id"] for i in manifest["ingredients"]] == ["t1", "t2"] and manifest["soup"]["r"] == 8
    assert manifest["self_check"]["passed"] and manifest["metrics"]["self_check_passed"]
    assert manifest["resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    trials = pd.read_parquet(Path(path) / "trials.parquet")
    assert list(trials["trial_id"]) == ["t1", "t2", "t3", "soup/delta_mean"]
    assert list(trials["in_soup"]) == [True, True, False, False]
    assert list(trials["artifact"]) == ["sft-fake"] * 3 + [Path(path).name]
    soup_row = trials.iloc[-1]
    assert soup_row["eval_loss"] == soup_row[METRIC] == manifest["metrics"]["eval_loss"]
    assert math.isfinite(soup_row["eval_loss"]) and len(manifest["candidates"]) == 2
    written = load_adapter(Path(path) / soup_row["adapter"])
    assert written.config["r"] == 8 and written.modules.keys() == load_adapter(adapters["a"]).modules.keys()
    # The finished artifact is found again, without Ray.
    assert soup_job.run(cfg, store, str(tiny_model_dir), str(tiny_data_dir), str(sft_dir)) == path
