"""Tests for vlm_posttrain.soup: exact LoRA adapter averaging on adapter files alone."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlm_posttrain import soup
from vlm_posttrain.soup import (
    delta_mean,
    delta_svd,
    factor_mean,
    greedy,
    load_adapter,
    self_check,
    write_adapter,
)

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
        rank, _ = soup._module_rank_alpha(config, name)
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
    plain = soup._soup_config({"r": 4, "lora_alpha": 4}, {"a.q": 8, "a.v": 4, "b.q": 8})
    assert plain["r"] == 8 and plain["rank_pattern"] == {"a.v": 4}
    ranks = {"encoder.fc": 8, "vision.encoder.fc": 4, "x.fc": 4}
    anchored = soup._soup_config({"r": 4, "lora_alpha": 4}, ranks)
    assert anchored["rank_pattern"] == {r"^encoder\.fc": 8}
    assert all(soup._module_rank_alpha(anchored, n) == (r, r) for n, r in ranks.items())


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
        "soup_manifest.json",
    }
    back = load_adapter(out)
    for name in SHAPES:
        assert rel_error(true_delta(back, name), result.delta(name)) < 1e-6
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 28 and config["rank_pattern"] == {}
    manifest = json.loads((out / "soup_manifest.json").read_text())
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

    code = "import sys, vlm_posttrain.soup; assert 'ray' not in sys.modules and 'peft' not in sys.modules"
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
