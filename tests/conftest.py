"""Shared pytest fixtures: offline hub, Ray on loopback, the ../shared data folder, tiny models built once."""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
LOOPBACK_SITE = REPO / "tests" / "loopback"


def _pin_ray_to_loopback() -> None:
    """Every Ray a test starts (``ray.init``, driver subprocesses, their workers) targets 127.0.0.1 only.

    Here before Ray is imported, and on PYTHONPATH for every process started from this one.
    """
    spec = importlib.util.spec_from_file_location(
        "_loopback_sitecustomize", LOOPBACK_SITE / "sitecustomize.py"
    )
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(LOOPBACK_SITE) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LOOPBACK_SITE), *paths]))


_pin_ray_to_loopback()
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real chart-QA data beside the checkout; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}: real-data tests need the shared folder")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny LLaVA (model + processor) saved to a folder; built once per session."""
    from vlm_posttrain.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train/val/test parquet of 48 synthetic charts at 64 px (the data stage's output layout)."""
    from vlm_posttrain.config import DataConfig
    from vlm_posttrain.data import build_splits

    out = tmp_path_factory.mktemp("data") / "data"
    build_splits(DataConfig(source="synthetic", limit=48, synthetic_image_size=64, val_fraction=0.2), 7, out)
    return out


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: configs/tiny.yaml rooted in tmp_path, with keyword sections merged over its YAML sections."""
    import yaml

    from vlm_posttrain.config import load_config

    def make(**sections):
        data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        data["run"]["root"] = str(tmp_path / "run")
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path)

    return make
