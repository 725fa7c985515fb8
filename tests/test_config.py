"""Config loading: every shipped config loads; bad keys, types and values fail naming the file and key path."""

from pathlib import Path

import pytest
import yaml

from vlm_posttrain.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert cfg.sft.trials()


def test_study_config_matches_the_study():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "study.yaml")
    assert cfg.model.name == "llava-hf/llava-1.5-7b-hf" and cfg.model.load_in_4bit
    trials = cfg.sft.trials()
    assert {(t.lora_alpha, t.lora_dropout) for t in trials} == {
        (16, 0.05),
        (16, 0.1),
        (8, 0.05),
        (8, 0.1),
    }
    assert {t.lora_r for t in trials} == {16}


def _write(tmp_path, data) -> Path:
    base = yaml.safe_load(CONFIGS[[p.name for p in CONFIGS].index("tiny.yaml")].read_text())
    for section, values in data.items():
        base.setdefault(section, {}).update(values)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"sft": {"learnin_rate": 1e-3}}, "sft.learnin_rate: unknown key"),
        ({"sft": {"batch_size": "eight"}}, "sft.batch_size: expected int"),
        ({"sft": {"lora_dropout": 1.5}}, "sft.lora_dropout: must be in [0, 1)"),
        ({"sft": {"grid": {"lora_rank": [8]}}}, "sft.grid.lora_rank: not a sweepable key"),
        ({"data": {"source": "csv"}}, "data.source: expected one of"),
        ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "data.val_fraction"),
        ({"resources": {"max_concurrent_trials": 0}}, "resources.max_concurrent_trials: must be >= 1"),
        ({"model": {"load_in_4bit": "yes"}}, "model.load_in_4bit: expected bool"),
        # Element types are checked too: a list's items, a grid's values, each against its field's type.
        ({"eval": {"variants": ["base", "sfft"]}}, "eval.variants: expected a list of one of 'base'"),
        ({"eval": {"system_prompts": ["", 3]}}, "eval.system_prompts: expected a list of str"),
        ({"sft": {"grid": {"lora_alpha": [16, "eight"]}}}, "sft.grid.lora_alpha: expected int values"),
        ({"sft": {"grid": {"lora_dropout": [0.05, 1.5]}}}, "sft.grid.lora_dropout: must be in [0, 1)"),
        ({"tracking": {"backend": "mlflow"}}, "tracking.tracking_uri: backend mlflow needs a tracking URI"),
        # Credentials belong in the environment, never in a config a manifest or a dashboard may show.
        (
            {"tracking": {"backend": "mlflow", "tracking_uri": "https://me:s3cret@mlflow.lab:5000"}},
            "tracking.tracking_uri: holds credentials; remove them and set MLFLOW_TRACKING_USERNAME",
        ),
        ({"model": {"family": "mllama"}}, "model.family: expected one of ''"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, change, needle):
    path = _write(tmp_path, change)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_section_and_missing_required(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "x"}, "model": {"name": "tiny"}, "data": {}, "sfft": {}}))
    with pytest.raises(ConfigError, match="sfft: unknown key"):
        load_config(path)
    path.write_text(yaml.safe_dump({"run": {"name": "x"}, "model": {"name": "tiny"}, "data": {}}))
    with pytest.raises(ConfigError, match=r"data: missing required key\(s\) source"):
        load_config(path)


def test_overrides_are_typed_and_checked(tmp_path):
    path = _write(tmp_path, {})
    cfg = load_config(path, ["sft.learning_rate=5e-4", "sft.grid={lora_dropout: [0.0, 0.1]}", "run.seed=3"])
    assert cfg.sft.learning_rate == 5e-4 and cfg.run.seed == 3
    assert [t.lora_dropout for t in cfg.sft.trials()] == [0.0, 0.1]
    with pytest.raises(ConfigError, match="sft.epochs: must be > 0"):
        load_config(path, ["sft.epochs=0"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(path, ["sft.epochs"])


def test_configs_are_frozen(tmp_path):
    cfg = load_config(_write(tmp_path, {}))
    with pytest.raises(AttributeError):
        cfg.sft.learning_rate = 1.0


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
