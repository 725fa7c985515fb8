"""The experiment config: one YAML file describes the whole experiment, loaded into frozen typed sections.

Each top-level YAML section mirrors one dataclass here (``model``, ``data``, ``sft``, ...); a stage reads only
its own section. Loading is strict: an unknown key, a wrong type or an impossible value fails at load time
with a one-line message naming the file and the key path. Overrides on the command line use ``key.sub=value``
with YAML-typed values:

    cfg = load_config("configs/tiny.yaml", ["sft.learning_rate=1e-3", "run.root=/tmp/run"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

LORA_LANGUAGE_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
GRID_KEYS = ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "epochs", "train_projector")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; researchers write learning rates that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config problem, reported as ``<file>: <key.path>: <what is wrong and how to fix it>``."""


@dataclass(frozen=True)
class RunConfig:
    name: str
    root: str = "runs"
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    # A hub id, a local folder, or "tiny": the offline tiny LLaVA, instruction-tuned on synthetic charts.
    name: str
    load_in_4bit: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora_target: str = LORA_LANGUAGE_TARGET
    trust_remote_code: bool = False
    tiny_pretrain_examples: int = 256
    tiny_pretrain_epochs: float = 6.0

    def validate(self) -> None:
        if self.trust_remote_code and self.name == "tiny":
            raise ValueError(
                "trust_remote_code: the built-in tiny model needs no remote code; set it to false"
            )


@dataclass(frozen=True)
class DataConfig:
    # synthetic: built-in chart generator; jsonl: a folder with annotations.jsonl + images/;
    # onevision: a parquet file/folder or hub dataset in the LLaVA-OneVision-Data row schema.
    source: Literal["synthetic", "jsonl", "onevision"]
    path: str = ""
    subset: str = ""
    limit: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    bad_rows: Literal["skip", "fail"] = "skip"
    synthetic_image_size: int = 128
    synthetic_turns: int = 1

    def validate(self) -> None:
        if self.source != "synthetic" and not self.path:
            raise ValueError(
                f"path: data.source '{self.source}' needs data.path (a folder, parquet or dataset)"
            )
        if self.source == "synthetic" and self.limit <= 0:
            raise ValueError("limit: the synthetic source needs limit > 0 (how many charts to generate)")
        if self.limit < 0:
            raise ValueError("limit: must be >= 0 (0 reads every row)")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction: val_fraction + test_fraction must leave some training data (< 1)")


@dataclass(frozen=True)
class SftConfig:
    learning_rate: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    train_projector: bool = False
    max_length: int = 2048
    logging_steps: int = 10
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    # Swept keys and their values; every combination is one Tune trial.
    grid: dict[str, list] = field(default_factory=dict)

    def validate(self) -> None:
        for key, values in self.grid.items():
            if key not in GRID_KEYS:
                raise ValueError(f"grid.{key}: not a sweepable key; choose from {', '.join(GRID_KEYS)}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{key}: give a non-empty list of values")
        for name in ("learning_rate", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        for name in ("batch_size", "grad_accum", "lora_r", "logging_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout: must be in [0, 1)")

    def trials(self) -> list[dict[str, Any]]:
        """Every grid point as the full set of trial hyperparameters."""
        points: list[dict[str, Any]] = [{}]
        for key, values in self.grid.items():
            points = [{**p, key: v} for p in points for v in values]
        base = {k: getattr(self, k) for k in GRID_KEYS}
        return [{**base, **p} for p in points]


@dataclass(frozen=True)
class ResourcesConfig:
    cpus_per_trial: float = 1.0
    # A fraction of one GPU per trial (Ray's scheduling label), 0 for CPU-only.
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 1
    max_failures: int = 1

    def validate(self) -> None:
        if self.cpus_per_trial <= 0:
            raise ValueError("cpus_per_trial: must be > 0")
        if not 0.0 <= self.gpus_per_trial <= 8:
            raise ValueError("gpus_per_trial: must be between 0 and 8")
        if self.max_concurrent_trials < 1:
            raise ValueError("max_concurrent_trials: must be >= 1")
        if self.max_failures < 0:
            raise ValueError("max_failures: must be >= 0")


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    sft: SftConfig = field(default_factory=SftConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # The file this config was loaded from; set by load_config, never read from YAML.
    source: str = field(default="", metadata={"internal": True})

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data, for hashing and manifests."""
        return dataclasses.asdict(getattr(self, name))


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin in (dict, list):
        return isinstance(value, origin)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _build(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {path or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{where}: {path + '.' if path else ''}{key}: unknown key; known keys: {', '.join(sorted(names))}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key_path = f"{path}.{f.name}" if path else f.name
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, where, key_path)
        elif not _type_ok(value, hint):
            raise ConfigError(f"{where}: {key_path}: expected {_describe(hint)}, got {value!r}")
        else:
            kwargs[f.name] = float(value) if hint is float else value
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)]
        raise ConfigError(
            f"{where}: {path or 'top level'}: missing required key(s) {', '.join(missing)}"
        ) from err
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as err:
            raise ConfigError(f"{where}: {path + '.' if path else ''}{err}") from None
    return obj


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def apply_override(data: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a nested mapping, the value parsed as YAML (``1e-3``, ``[8, 16]``, ``true``)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected key.path=value, e.g. sft.learning_rate=1e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': {part} is not a section")
    node[parts[-1]] = yaml_load(raw)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load, override and validate an experiment YAML; errors name the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass a YAML file such as configs/tiny.yaml")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    for override in overrides:
        apply_override(data, override)
    cfg = _build(ExperimentConfig, data, str(path), "")
    return dataclasses.replace(cfg, source=str(path))
