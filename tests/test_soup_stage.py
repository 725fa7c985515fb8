"""The soup stage around the soup math (tests/test_soup.py): selection, real tiny-LLaVA adapters, refusal, Ray task.

Adapters are made with PEFT directly on the tiny LLaVA (no Tune): LoRA on the language model through the
config's regex, lora_B perturbed so every adapter really changes the model.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_soup_stage.py -q
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

from vlm_posttrain import modeling, soup
from vlm_posttrain.config import LORA_LANGUAGE_TARGET, ConfigError, ModelConfig, SftConfig, SoupConfig
from vlm_posttrain.soup import METRIC, SoupCheckError, load_adapter, make_soup, select_adapters
from vlm_posttrain.soup_task import build_soup

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


def true_delta(adapter, name: str) -> torch.Tensor:
    a, b = adapter.modules[name]
    return adapter.scales[name] * (b.double() @ a.double())


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
    real = soup.delta_mean

    def corrupted(adapters, weights=None):
        result = real(adapters, weights)
        name = sorted(result.tensors)[0]
        a, b = result.tensors[name]
        return soup.replace(result, tensors={**result.tensors, name: (a * 1.001, b)})

    monkeypatch.setattr(soup, "delta_mean", corrupted)
    with pytest.raises(SoupCheckError, match="failed its self-check, nothing written"):
        make_soup(ingredients, "delta_mean", tmp_path / "soup")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(soup, "delta_mean", real)
    monkeypatch.setattr(soup, "_check_written", lambda result, path: 1.0)  # the file reads back wrong
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
            SoupConfig(select="all"),
            SftConfig(),
            ModelConfig(name="nowhere"),
            "skip",
            0,
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
        SoupConfig(method="greedy", select="all"),
        SftConfig(batch_size=4),
        model_cfg,
        "skip",
        0,
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
