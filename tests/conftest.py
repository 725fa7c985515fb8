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
def local_ray():
    """One local Ray (2 CPUs, loopback) for every test that runs a stage on Ray; the drivers' ``connect()`` finds
    it. Starting Ray costs ~10 s on 2 cores, and its idle workers, torch already imported, serve later tests.
    Tests that need Ray nodes of their own (``cluster``) start them separately."""
    import ray

    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


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


@pytest.fixture(scope="session")
def llama2_gguf(shared_data) -> Path:
    """The real Llama-2 SentencePiece vocabulary (LLaVA-1.5-7B's tokenizer) in ../shared/data/tokenizers."""
    path = shared_data / "tokenizers" / "llama2-spm.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found: the real-tokenizer tests need the shared tokenizers folder")
    return path


@pytest.fixture(scope="session")
def llava15_builder(llama2_gguf, tmp_path_factory):
    """Builds the LLaVA-1.5-shaped model with the real processor once per tokenizer pipeline and session."""
    from vlm_posttrain.llava15 import build_llava15

    built: dict[str, Path] = {}

    def build(pipeline: str) -> Path:
        if pipeline not in built:
            out = tmp_path_factory.mktemp(f"llava15-{pipeline}") / "model"
            built[pipeline] = build_llava15(out, llama2_gguf, pipeline)
        return built[pipeline]

    return build


@pytest.fixture(scope="session", params=["legacy", "metaspace"])
def llava15_dir(request, llava15_builder) -> Path:
    """The LLaVA-1.5-shaped model under each tokenizer pipeline that gives the documented ids."""
    return llava15_builder(request.param)


@pytest.fixture(scope="session")
def llava15_legacy_dir(llava15_builder) -> Path:
    """The LLaVA-1.5-shaped model under the legacy pipeline (most likely what the hub's tokenizer.json holds)."""
    return llava15_builder("legacy")


@pytest.fixture(scope="session")
def lrv_data_dir(shared_data, tmp_path_factory) -> Path:
    """train/val/test parquet of the first LRV-Chart rows from ../shared/data, as the data stage writes them."""
    from vlm_posttrain.config import DataConfig
    from vlm_posttrain.data import build_splits

    source = shared_data / "lrv_chart_train"
    out = tmp_path_factory.mktemp("lrv") / "data"
    build_splits(
        DataConfig(source="jsonl", path=str(source), limit=40, val_fraction=0.2, test_fraction=0.2), 0, out
    )
    return out
