"""Safety rules: no remote code unless the config asks for it, safetensors only, tokens never written, and a
run writes under its run root only (library caches aside).

The Ray stages are checked for planted tokens by tests/test_cluster.py, on a real cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_posttrain import modeling
from vlm_posttrain.config import ConfigError, ModelConfig, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
PACKAGES = ("vlm_posttrain", "ray_jobs", "trainables", "analysis")
PLANTED = {
    "HF_TOKEN": "hf_PLANTEDsafetyTOKEN0123456789ab",
    "AWS_SECRET_ACCESS_KEY": "PLANTEDsafetyCLOUDkey42",
}
SMALL = ["model.tiny_pretrain_examples=16", "model.tiny_pretrain_epochs=1", "data.limit=40"]


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]


def test_trust_remote_code_is_off_unless_the_config_turns_it_on(tiny_model_dir, monkeypatch):
    assert ModelConfig(name="some/model").trust_remote_code is False
    for path in _sources():
        assert "trust_remote_code=True" not in path.read_text(), f"{path} turns remote code on by itself"
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_config(TINY, ["model.trust_remote_code=true"])  # the built-in model needs none

    seen = []
    monkeypatch.setattr(
        modeling.AutoModelForImageTextToText, "from_pretrained", lambda path, **kw: seen.append(kw)
    )
    modeling.load_base(str(tiny_model_dir), ModelConfig(name=str(tiny_model_dir)))
    modeling.load_base(str(tiny_model_dir), ModelConfig(name=str(tiny_model_dir), trust_remote_code=True))
    assert [kw["trust_remote_code"] for kw in seen] == [False, True]
    assert all(kw["use_safetensors"] for kw in seen)


def test_pickled_model_weights_are_refused(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(modeling.ModelLoadError, match=r"pickled \.bin.*re-save them as safetensors"):
        modeling.load_base(str(folder), ModelConfig(name=str(folder)))


def test_pickled_adapters_are_refused(tmp_path):
    from vlm_posttrain.soup.adapters import load_adapter as soup_load_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    torch.save({"w": torch.zeros(2)}, adapter / "adapter_model.bin")
    with pytest.raises(modeling.ModelLoadError, match="only safetensors adapters"):
        modeling.load_adapter(None, adapter)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        soup_load_adapter(adapter)


def test_planted_tokens_never_reach_manifests_logs_or_reports(tmp_path, monkeypatch, capsys):
    from ray_jobs import data as data_job
    from ray_jobs import report as report_job

    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "run"
    data_job.main([TINY, f"run.root={root}", "data.limit=12"])
    report_job.main([TINY, f"run.root={root}"])
    out = capsys.readouterr()
    written = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and any(p.suffix == ".md" for p in written)
    for token in PLANTED.values():
        assert token not in out.out + out.err
        for path in written:
            assert token.encode() not in path.read_bytes(), f"planted token written to {path}"


# Library caches are the environment's, not the run's: matplotlib's font cache, torch's compile cache.
ALLOWED_OUTSIDE = ("home/.cache/matplotlib", "home/.config/matplotlib", "tmp/torchinductor_")


def test_a_run_writes_only_under_its_run_root(tmp_path):
    """Model (tiny build), data and report stages in a fresh process whose cwd, HOME and TMPDIR start empty."""
    dirs = {name: tmp_path / name for name in ("cwd", "home", "tmp")}
    for d in dirs.values():
        d.mkdir()
    root = tmp_path / "root"
    argv = [TINY, f"run.root={root}", *SMALL]
    code = (
        "import sys\n"
        "from ray_jobs import data, model, report\n"
        f"argv = {argv!r}\n"
        "model.main(argv); data.main(argv); report.main(argv)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(dirs["home"]),
        "TMPDIR": str(dirs["tmp"]),
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=dirs["cwd"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["data", "model", "report"]
    outside = [
        str(p.relative_to(tmp_path))
        for d in dirs.values()
        for p in d.rglob("*")
        if p.is_file() and not str(p.relative_to(tmp_path)).startswith(ALLOWED_OUTSIDE)
    ]
    assert not outside, f"written outside the run root: {outside}"
