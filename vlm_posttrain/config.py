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
from typing import Any, ClassVar, Literal

import yaml

# PEFT full-matches the regex against module names: the language model's projections only, never the vision
# tower's (CLIP's q/k/v_proj, Qwen2.5-VL's gate/up/down_proj), in every family (vlm_posttrain.families).
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
    # A hub id, a local folder, or "tiny": the offline tiny model, instruction-tuned on synthetic charts.
    name: str
    # The model family (vlm_posttrain.families): read from the checkpoint's config.json; for "tiny", which
    # family's tiny model to build ("" is LLaVA-1.5's).
    family: Literal["", "llava", "llava_onevision", "qwen2_vl"] = ""
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
        if self.name != "tiny":
            self._check_family()

    def _check_family(self) -> None:
        from vlm_posttrain import families

        model_type = families.known_model_type(self.name)
        if model_type is None:
            return  # not readable offline: the model stage's check_source names what is missing
        try:
            detected = families.by_model_type(model_type, self.name)
        except families.UnknownArchitecture as err:
            raise ValueError(f"name: {err}") from None
        if self.family and self.family != detected.name:
            raise ValueError(
                f"family: '{self.family}' but model '{self.name}' is a {detected.name} model; remove "
                "model.family (it is read from the checkpoint)"
            )

    @property
    def family_name(self) -> str:
        """The family this model belongs to (``tiny``: the one it builds)."""
        if self.name == "tiny":
            return self.family or "llava"
        from vlm_posttrain import families

        return families.detect(self.name).name


@dataclass(frozen=True)
class DataConfig:
    # synthetic: built-in chart generator; jsonl: a folder with annotations.jsonl + images/;
    # onevision: a parquet file/folder or hub dataset in the LLaVA-OneVision-Data row schema;
    # splits: a folder already holding train/val/test.parquet in this project's schema, kept as split
    # (a pairs artifact's best_of_k/: the rejection-sampled answers as SFT data for a later round).
    source: Literal["synthetic", "jsonl", "onevision", "splits"]
    path: str = ""
    subset: str = ""
    limit: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    bad_rows: Literal["skip", "fail"] = "skip"
    synthetic_image_size: int = 128
    synthetic_turns: int = 1
    # Question families of the synthetic charts (vlm_posttrain.charts.FAMILIES); [] is the reading families
    # (values, extremes, comparisons, summaries, trends).
    synthetic_families: list[str] = field(default_factory=list)
    # The data stage downscales (once, Lanczos, re-encoded as PNG) any image whose SHORT side is over this
    # many pixels to exactly this short side; images within it keep their bytes. LLaVA-1.5's processor
    # resizes the short side to 336 and centre-crops 336 x 336, so from 4 x 336 = 1344 down its input is
    # the same (both resizes antialias), while a 12000 x 9000 chart (108 MP, 324 MB decoded) becomes
    # 1792 x 1344 (7 MB) for every later stage; 1344 is also the largest side LLaVA-NeXT's any-resolution
    # grids use. 0: no downscale. Images over vlm_posttrain.data.MAX_IMAGE_PIXELS are refused either way.
    max_image_side: int = 1344

    def validate(self) -> None:
        if self.max_image_side != 0 and self.max_image_side < 336:
            raise ValueError(
                "max_image_side: must be 0 (no downscale) or >= 336 (LLaVA-1.5's input side; a smaller "
                "bound would change what the model sees)"
            )
        if self.source != "synthetic" and not self.path:
            raise ValueError(
                f"path: data.source '{self.source}' needs data.path (a folder, parquet or dataset)"
            )
        if self.source == "synthetic" and self.limit <= 0:
            raise ValueError("limit: the synthetic source needs limit > 0 (how many charts to generate)")
        if self.synthetic_families:
            from vlm_posttrain.charts import FAMILIES, KINDS, validate_families

            try:
                validate_families(tuple(self.synthetic_families), KINDS)
            except ValueError as err:
                raise ValueError(f"synthetic_families: {err}; known: {', '.join(FAMILIES)}") from None
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
            hint = typing.get_type_hints(SftConfig)[key]
            for value in values:
                if not _type_ok(value, hint):
                    raise ValueError(f"grid.{key}: expected {_describe(hint)} values, got {value!r}")
        for name in ("learning_rate", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        for name in ("batch_size", "grad_accum", "lora_r", "logging_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout: must be in [0, 1)")
        if self.grid:
            for trial in self.trials():
                try:
                    trial.validate()
                except ValueError as err:
                    raise ValueError(f"grid.{err}") from None

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as its swept values, first key slowest (the order Tune's grid_search runs them)."""
        points: list[dict[str, Any]] = [{}]
        for key, values in self.grid.items():
            points = [{**p, key: v} for p in points for v in values]
        return points

    def at(self, point: dict[str, Any]) -> SftConfig:
        """This config at one grid point: one trial's whole typed config, with no grid left to sweep."""
        unknown = sorted(set(point) - set(GRID_KEYS))
        if unknown:
            raise ValueError(
                f"grid point {point}: {', '.join(unknown)} not sweepable; choose from {GRID_KEYS}"
            )
        hints = typing.get_type_hints(SftConfig)
        values = {k: float(v) if hints[k] is float else v for k, v in point.items()}
        return dataclasses.replace(self, grid={}, **values)

    def trials(self) -> list[SftConfig]:
        """One typed config per trial: the grid expanded here, and only here."""
        return [self.at(point) for point in self.points()]


@dataclass(frozen=True)
class SoupConfig:
    # delta_mean: exact mean of the adapters' ΔW (rank Σr); delta_svd: that mean truncated to svd_rank;
    # factor_mean: the study's mean of A's and of B's, a labelled baseline (NOT the mean of the ΔW);
    # greedy: add trials best-first to the delta_mean soup, keeping each only if the val loss does not rise.
    method: Literal["delta_mean", "delta_svd", "factor_mean", "greedy"] = "delta_mean"
    # Which SFT trials go in: all, the top_k by validation loss, or the LoRA rank group that does best.
    select: Literal["all", "top_k", "best_rank"] = "best_rank"
    top_k: int = 2
    # best_rank scores each rank group by its best trial's validation loss, or by the group's mean.
    rank_metric: Literal["best", "mean"] = "best"
    # The target rank of delta_svd (read by no other method).
    svd_rank: int = 0
    # The only weighting so far; the soup math itself takes any non-negative weights.
    weights: Literal["uniform"] = "uniform"
    # Resources of the one Ray task.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Settings that never change what the artifact holds: left out of its key (ExperimentConfig.keyed).
    UNKEYED: ClassVar[tuple[str, ...]] = ("num_cpus", "num_gpus")

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError("top_k: must be >= 1")
        if self.svd_rank < 0:
            raise ValueError("svd_rank: must be >= 0")
        if self.method == "delta_svd" and self.svd_rank == 0:
            raise ValueError(
                "svd_rank: method delta_svd needs svd_rank > 0 (the rank to truncate the mean to)"
            )
        if self.num_cpus <= 0:
            raise ValueError("num_cpus: must be > 0")
        if not 0.0 <= self.num_gpus <= 8:
            raise ValueError("num_gpus: must be between 0 and 8")


@dataclass(frozen=True)
class PairsConfig:
    # Who picks chosen vs rejected: the policy itself (label-token probabilities), a critic VLM
    # (LLaVA-Critic's pairwise prompt), or closeness to the reference answer.
    judge: Literal["self", "critic", "reference"] = "self"
    # The critic checkpoint (hub id or folder of any image-text-to-text model); read by judge=critic only.
    critic_model: str = ""
    # Samples per prompt; every pair of them is judged in both orders.
    k: int = 2
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 200
    # How many train prompts to use (the first ones of train.parquet); 0 uses all.
    limit: int = 0
    # Self judge: |log p(label 1) - log p(label 2)| below this (nats) is a tie, not a verdict.
    tie_margin: float = 0.1
    # Critic judge: tokens the critic may write for its verdict and reasoning.
    critic_max_new_tokens: int = 256
    # The stage warns when fewer than this share of its prompts keep a pair (DPO would learn from few).
    warn_kept_below: float = 0.25
    # Execution: actors per pool (one generator pool, one judge pool), prompts per batch (and model inputs
    # per judge forward), resources of each actor.
    actors: int = 1
    batch_size: int = 8
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Settings that never change what the artifact holds: left out of its key (ExperimentConfig.keyed).
    UNKEYED: ClassVar[tuple[str, ...]] = ("actors", "batch_size", "num_cpus", "num_gpus", "warn_kept_below")

    def validate(self) -> None:
        if self.judge == "critic" and not self.critic_model:
            raise ValueError("critic_model: judge 'critic' needs critic_model (a hub id or model folder)")
        if self.k < 2:
            raise ValueError("k: a preference pair needs k >= 2 samples per prompt")
        if self.temperature <= 0:
            raise ValueError("temperature: must be > 0 (k samples at temperature 0 are all the same answer)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p: must be in (0, 1]")
        for name in ("max_new_tokens", "critic_max_new_tokens", "actors", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.limit < 0:
            raise ValueError("limit: must be >= 0 (0 uses every train prompt)")
        if self.tie_margin < 0:
            raise ValueError("tie_margin: must be >= 0")
        if not 0.0 <= self.warn_kept_below <= 1.0:
            raise ValueError("warn_kept_below: must be in [0, 1] (a share of the prompts)")
        if self.num_cpus <= 0:
            raise ValueError("num_cpus: must be > 0")
        if not 0.0 <= self.num_gpus <= 8:
            raise ValueError("num_gpus: must be between 0 and 8")


@dataclass(frozen=True)
class DpoConfig:
    # TRL's DPO knobs. Every loss here has a known value at zero margin, so the first step checks that the
    # reference really is the starting policy (ln 2 for sigmoid).
    beta: float = 0.1
    loss_type: Literal["sigmoid", "sigmoid_norm", "hinge", "ipo", "bco_pair", "apo_zero"] = "sigmoid"
    learning_rate: float = 5e-6
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    # Tokens of prompt (image tokens included) + the longer answer; a pair that would not fit is an error,
    # never truncated (cut image tokens corrupt VLM training).
    max_length: int = 2048
    logging_steps: int = 10
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    # Share of the pairs (by prompt, drawn with the run's seed) kept out of training: TRL evaluates the
    # trained policy on them, so the report can say whether the preference generalises to unseen prompts.
    holdout_fraction: float = 0.0
    # pairs -> dpo rounds; round r trains from round r-1's policy on pairs that policy generated.
    rounds: int = 1
    # How many rounds follow never changes one round's adapter: left out of its key (the round is an input).
    UNKEYED: ClassVar[tuple[str, ...]] = ("rounds",)

    def validate(self) -> None:
        for name in ("beta", "learning_rate", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio: must be in [0, 1)")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError("holdout_fraction: must be in [0, 1) (0 trains on every pair)")


@dataclass(frozen=True)
class EvalConfig:
    # Which model variants answer the test split: the base, every SFT trial, the soup, every DPO round.
    variants: list[Literal["base", "sft", "soup", "dpo"]] = field(
        default_factory=lambda: ["base", "sft", "soup", "dpo"]
    )
    # Each system prompt multiplies the variants ("" is none): a system-prompt ablation costs one line.
    system_prompts: list[str] = field(default_factory=lambda: [""])
    # Answers per test prompt; temperature 0 is greedy (then samples must be 1).
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    # Test prompts to use (the first ones of test.parquet); 0 uses all.
    limit: int = 0
    judges: list[Literal["reference", "critic"]] = field(default_factory=lambda: ["reference"])
    # The critic checkpoint (hub id or folder) for judge "critic", and how its score is read.
    critic_model: str = ""
    critic_mode: Literal["generate", "expected"] = "generate"
    critic_max_new_tokens: int = 256
    # Execution.
    actors: int = 1
    batch_size: int = 16
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Settings that never change the answers and scores: left out of the artifact's key.
    UNKEYED: ClassVar[tuple[str, ...]] = ("actors", "batch_size", "num_cpus", "num_gpus")

    def validate(self) -> None:
        if not self.variants:
            raise ValueError("variants: list at least one of base, sft, soup, dpo")
        if not self.system_prompts:
            raise ValueError("system_prompts: give a list of strings ('' for no system prompt)")
        if "critic" in self.judges and not self.critic_model:
            raise ValueError("critic_model: judge 'critic' needs critic_model (a hub id or model folder)")
        if self.samples < 1 or (self.temperature == 0 and self.samples > 1):
            raise ValueError(
                "samples: must be >= 1, and 1 with temperature 0 (greedy answers are all the same)"
            )
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("temperature: must be >= 0 and top_p in (0, 1]")
        for name in ("max_new_tokens", "critic_max_new_tokens", "actors", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.limit < 0:
            raise ValueError("limit: must be >= 0 (0 uses every test prompt)")


@dataclass(frozen=True)
class ResourcesConfig:
    cpus_per_trial: float = 1.0
    # A fraction of one GPU per trial (Ray's scheduling label), 0 for CPU-only, or "auto": as many trials per
    # card as their memory estimate allows (vlm_posttrain.memory). A fraction that would not fit is refused.
    gpus_per_trial: float | Literal["auto"] = 0.0
    # The card size (decimal GB) that trials are planned against; 80 for an A100/H100 80GB.
    gpu_memory_gb: float = 80.0
    max_concurrent_trials: int = 1
    max_failures: int = 1

    def validate(self) -> None:
        if self.cpus_per_trial <= 0:
            raise ValueError("cpus_per_trial: must be > 0")
        if self.gpus_per_trial != "auto" and not 0.0 <= self.gpus_per_trial <= 8:
            raise ValueError("gpus_per_trial: must be between 0 and 8, or auto")
        if self.gpu_memory_gb <= 0:
            raise ValueError("gpu_memory_gb: must be > 0 (the card's memory in GB)")
        if self.max_concurrent_trials < 1:
            raise ValueError("max_concurrent_trials: must be >= 1")
        if self.max_failures < 0:
            raise ValueError("max_failures: must be >= 0")


@dataclass(frozen=True)
class TrackingConfig:
    # "mlflow": the SFT and DPO trials through Ray Tune's MLflowLoggerCallback, and the run's results (every
    # stage's metrics, every eval variant's mean and interval, the report) once per run. Off by default.
    backend: Literal["none", "mlflow"] = "none"
    # An MLflow tracking server (http://host:5000), or a local store (file:///path/mlruns needs
    # MLFLOW_ALLOW_FILE_STORE=true). Credentials come from the environment (MLFLOW_TRACKING_TOKEN, ...), never here.
    tracking_uri: str = ""
    # The MLflow experiment; "" is run.name.
    experiment: str = ""

    def validate(self) -> None:
        if self.backend == "mlflow" and not self.tracking_uri:
            raise ValueError(
                "tracking_uri: backend mlflow needs a tracking URI (http://host:5000, file:///path)"
            )
        if self.backend == "mlflow":
            import importlib.util

            if importlib.util.find_spec("mlflow") is None:
                raise ValueError("backend: mlflow needs the MLflow client; pip install mlflow-skinny")
        netloc = self.tracking_uri.split("://", 1)[-1].split("/", 1)[0]
        if "@" in netloc:
            raise ValueError(
                "tracking_uri: holds credentials; remove them and set MLFLOW_TRACKING_USERNAME/PASSWORD or "
                "MLFLOW_TRACKING_TOKEN in the environment"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    sft: SftConfig = field(default_factory=SftConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # The file this config was loaded from; set by load_config, never read from YAML.
    source: str = field(default="", metadata={"internal": True})

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data, as every manifest records it."""
        return dataclasses.asdict(getattr(self, name))

    def keyed(self, name: str) -> dict[str, Any]:
        """One section as its artifact's key sees it: without the settings that never change what the stage
        makes (its ``UNKEYED``: resources, pool and batch sizes, a warning threshold)."""
        unkeyed = getattr(type(getattr(self, name)), "UNKEYED", ())
        return {k: v for k, v in self.section(name).items() if k not in unkeyed}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _type_ok(k, key) and _type_ok(v, item) for k, v in value.items()
        )
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        key, item = (_describe(h) for h in typing.get_args(hint))
        return f"a mapping of {key} to {item}"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
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
