"""The embedded default's stages on a tiny model of each other family, then one cross-run comparison.

LLaVA-1.5 runs in test_pipeline; here LLaVA-OneVision (anyres) and Qwen2.5-VL (dynamic resolution) go
through the same pipeline on Ray: an SFT trial, the soup, self-critique pairs, a DPO step, eval of every
variant and the report, on charts of two sizes so that images differ in token count inside a batch. Then
``analysis.compare`` puts both runs in one table, each family's gains over its own base.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

FAMILIES = ["llava_onevision", "qwen2_vl"]
ROOTS: dict[str, Path] = {}


def mixed_size_charts(out: Path) -> Path:
    """Synthetic chart splits in which every other chart is stretched to 2:1, so images differ in token count
    within a batch (the synthetic source draws one size)."""
    from PIL import Image

    from vlm_posttrain.config import DataConfig
    from vlm_posttrain.data import build_splits, decode_image

    # One-sentence summaries: the briefly tuned base answers in chart words, which the reference judge scores
    # by their overlap with the reference sentence (partial credit, so samples rarely tie).
    config = DataConfig(
        source="synthetic", limit=64, val_fraction=0.125, test_fraction=0.125, synthetic_families=["summary"]
    )
    build_splits(config, 7, out)
    for file in out.glob("*.parquet"):
        frame = pd.read_parquet(file)
        for i in range(0, len(frame), 2):
            wide = decode_image(frame.at[i, "image"]).resize((96, 48), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            wide.save(buf, "PNG")
            frame.at[i, "image"] = buf.getvalue()
        frame.to_parquet(file, index=False)
    return out


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_runs_on_the_family(family, tiny_config, tmp_path, local_ray, capsys):
    from PIL import Image

    from ray_jobs import pipeline
    from vlm_posttrain import families, modeling
    from vlm_posttrain.data import decode_image

    data = mixed_size_charts(tmp_path / "charts")
    cfg = tiny_config(
        run={"name": f"tiny-{family}", "root": str(tmp_path / f"tiny-{family}")},
        # The model stage builds the family's tiny base (tuned briefly, ~14 s: it answers in chart words).
        model={"name": "tiny", "family": family, "tiny_pretrain_examples": 64, "tiny_pretrain_epochs": 8},
        data={"source": "splits", "path": str(data), "limit": 0},
        sft={"epochs": 1, "grid": {}, "batch_size": 8},
        # The reference judge: a barely tuned model's self-verdicts are its letter bias, all ties (the self judge
        # runs on each family in test_families).
        pairs={"judge": "reference", "k": 3, "max_new_tokens": 10, "batch_size": 8, "limit": 16},
        dpo={"epochs": 1, "batch_size": 2, "warmup_ratio": 0.0, "holdout_fraction": 0.0},
        eval={"limit": 4, "max_new_tokens": 6, "batch_size": 8},
    )
    assert cfg.model.family_name == family
    pipeline.main([str(tmp_path / "config.yaml")])
    capsys.readouterr()

    root = Path(cfg.run.root)
    sft_adapters = list(root.glob("sft/sft-*/adapters/*/adapter_model.safetensors"))
    assert len(sft_adapters) == 1
    (soup,) = root.glob("soup/soup-*")
    (pairs,) = root.glob("pairs/pairs-*")
    assert len(pd.read_parquet(pairs / "pairs.parquet")) > 0
    (dpo,) = root.glob("dpo/dpo-*")
    assert _manifest(dpo)["inputs"]["start_adapter"] == str(soup / "adapter")
    (eval_dir,) = root.glob("eval/eval-*")
    answers = pd.read_parquet(eval_dir / "eval.parquet")
    assert {"base", "soup/delta_mean", "dpo/round1"} <= set(answers["variant"])
    assert answers["reference/score"].notna().all()
    (report,) = root.glob("report/report-*/report.md")
    assert "dpo/round1" in report.read_text()
    (model,) = root.glob("model/model-*")
    assert families.detect(str(model)).name == family
    processor = modeling.load_processor(str(model))
    sizes = {decode_image(b).size for b in pd.read_parquet(data / "test.parquet")["image"]}
    assert len({families.image_tokens(processor, Image.new("RGB", s)) for s in sizes}) == 2
    ROOTS[family] = root


@pytest.mark.slow
def test_the_cross_run_report_puts_each_family_beside_the_other(tmp_path):
    from analysis import compare

    missing = [f for f in FAMILIES if f not in ROOTS]
    if missing:
        pytest.skip(f"the family runs of {missing} did not run in this session")
    roots = [str(ROOTS[f]) for f in FAMILIES]
    gains = compare.gains(roots)
    assert set(gains["run"]) == {f"tiny-{f}" for f in FAMILIES}
    assert dict(zip(gains["run"], gains["family"], strict=True)) == {f"tiny-{f}": f for f in FAMILIES}
    assert {"soup/delta_mean", "dpo/round1"} <= set(gains["variant"])
    assert gains.groupby("run")["variant"].nunique().min() >= 3  # SFT, soup and DPO for each family
    compare.main([*roots, "--out", str(tmp_path / "cmp")])
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    for f in FAMILIES:
        assert f"tiny-{f}" in text
