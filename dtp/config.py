"""The run configuration: a frozen, typed value built from YAML and the command line.

`Config` and its sections are the schema: a key they do not have is rejected with a suggestion, and each
value is checked against its field's type (and range: `AtLeast`, `OneOf`) as it is read. Their defaults are
the knobs a config file rarely sets; a network's shape and its per-block lists come from the config file,
which is configs/<dataset>_<algorithm>.yaml unless --config names one (docs/design.md §7).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import yaml

from dtp.algorithm import VARIANTS
from dtp.drl import check_drl_settings
from dtp.errors import ConfigError
from dtp.layers import ACTIVATIONS as ACTIVATION_LAYERS
from dtp.graphs import GRAPH_SETTINGS
from dtp.optim import OPTIMIZERS

ALGORITHMS = tuple(VARIANTS)
ARCHS = ("simple_vgg", "lenet", "resnet18", "resnet34", "mlp")
ACTIVATIONS = tuple(ACTIVATION_LAYERS)
MIXED_PRECISION = ("no", "bf16")
SCHEDULERS = ("cosine", "step", "none")
PER_BLOCK_KEYS = ("iterations", "noise", "lr")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
REFERENCE_DATASET = "cifar10"  # whose configs a dataset without its own starts from (npz)


@dataclass(frozen=True)
class OneOf:
    """A field's allowed values."""

    choices: tuple[str, ...]


@dataclass(frozen=True)
class AtLeast:
    """A number field's lower bound, and how an error states it."""

    low: float
    strict: bool
    wanted: str

    def holds(self, value: float) -> bool:
        return value > self.low if self.strict else value >= self.low


PositiveInt = Annotated[int, AtLeast(0, True, "a positive integer")]
NonNegativeInt = Annotated[int, AtLeast(0, False, "an integer ≥ 0")]
PositiveFloat = Annotated[float, AtLeast(0, True, "a positive number")]
NonNegativeFloat = Annotated[float, AtLeast(0, False, "a number ≥ 0")]


@dataclass(frozen=True)
class ModelConfig:
    arch: Annotated[str, OneOf(ARCHS)] = "simple_vgg"  # dtp/models.py; none has batch norm
    # simple_vgg, lenet: one conv-pool block per entry; resnet*: exactly 4 stage widths, the stem takes the first;
    # mlp: one hidden layer's width per entry
    channels: tuple[PositiveInt, ...] = ()
    activation: Annotated[str, OneOf(ACTIVATIONS)] = "elu"  # every activation, feedback included
    hidden: PositiveInt = 512  # lenet only: units of its hidden linear layer
    bias: tuple[bool, ...] = ()  # mlp only: per linear layer, hidden ones then the classifier (empty: all)
    init: Annotated[str, OneOf(("default", "xavier_normal"))] = "default"  # xavier_normal: and zero biases


@dataclass(frozen=True)
class FeedbackConfig:
    """Per-block lists are in forward order, blocks 1..N (G_0 is never trained)."""

    iterations: tuple[PositiveInt, ...] = ()
    noise: tuple[PositiveFloat, ...] = ()
    lr: tuple[PositiveFloat, ...] = ()
    optimizer: Annotated[str, OneOf(OPTIMIZERS)] = "sgd"  # momentum applies to sgd only
    momentum: NonNegativeFloat = 0.9
    weight_decay: NonNegativeFloat = 0.0
    samples: PositiveInt = 1
    init_symmetric: bool = False  # start G's weights at the transposes of F's (its biases as initialised)
    betas: tuple[NonNegativeFloat, ...] = (0.9, 0.999)  # adam only (torch's defaults)
    eps: PositiveFloat = 1e-8  # adam only
    fb_epochs: NonNegativeInt = 0  # drl (s-DDTP): feedback-only passes over the training set before epoch 0
    extra_fb_epochs: NonNegativeInt = 0  # drl (s-DDTP): feedback-only passes before every later epoch
    # Each block's k_i iterations as one CUDA graph, blocks on concurrent streams (dtp/graphs.py); off until
    # measured on a GPU.
    cuda_graphs: Annotated[str, OneOf(GRAPH_SETTINGS)] = "off"


@dataclass(frozen=True)
class ForwardConfig:
    lr: PositiveFloat = 0.08
    lrs: tuple[PositiveFloat, ...] = ()  # one per forward block F_0..F_N instead of lr (empty: lr for all)
    normalize_lr: bool = False  # use lr / beta (Meulemans et al.'s normalize_lr), for lr and lrs alike
    betas: tuple[NonNegativeFloat, ...] = (0.9, 0.999)  # adam only
    eps: tuple[PositiveFloat, ...] = ()  # adam only: one per forward block F_0..F_N (empty: 1e-8 for all)
    optimizer: Annotated[str, OneOf(OPTIMIZERS)] = "sgd"
    momentum: NonNegativeFloat = 0.9
    weight_decay: NonNegativeFloat = 1e-4
    beta: float = 0.7
    scheduler: Annotated[str, OneOf(SCHEDULERS)] = "cosine"  # per epoch: cosine (t_max, eta_min), step, none
    t_max: PositiveInt = 85
    eta_min: NonNegativeFloat = 1e-5
    step_size: PositiveInt = 30
    gamma: PositiveFloat = 0.1


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: Annotated[int, AtLeast(0, False, "0 (off) or a positive integer")] = 0  # evaluations without gain
    min_delta: NonNegativeFloat = 0.0


@dataclass(frozen=True)
class LogConfig:
    every: PositiveInt = 10
    angles_every: PositiveInt = 50


@dataclass(frozen=True)
class Config:
    dataset: str = REFERENCE_DATASET
    data_dir: str | None = None
    download: bool = False
    algorithm: Annotated[str, OneOf(ALGORITHMS)] = "dtp"
    seed: int = 0
    epochs: PositiveInt = 90
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 500
    mixed_precision: Annotated[str, OneOf(MIXED_PRECISION)] = "no"
    precision: Annotated[str, OneOf(("float32", "float64"))] = "float32"  # the weights' and inputs' dtype
    augment: bool = True  # random crop and flip of training batches (docs/design.md §8)
    normalize: Annotated[str, OneOf(("dataset", "half"))] = "dataset"  # per-channel statistics, or 0.5 and 0.5
    model: ModelConfig = field(default_factory=ModelConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists: what checkpoints, config.yaml and TensorBoard store."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _typed(value: Any, hint: Any, name: str) -> Any:
    """`value` checked against the field type `hint` (and its Annotated rule) and converted to it."""
    rule = None
    if get_origin(hint) is Annotated:
        hint, rule = get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{name}' is a section; give it a mapping, not {value!r}")
        return _build(hint, value, f"{name}.")
    if get_origin(hint) in (Union, types.UnionType):  # X | None
        return None if value is None else _typed(value, next(a for a in get_args(hint) if a is not type(None)), name)
    if get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(_typed(v, get_args(hint)[0], f"every entry of {name}") for v in value)
    if isinstance(rule, OneOf) and isinstance(value, bool) and {"on", "off"} <= set(rule.choices):
        value = "on" if value else "off"  # YAML 1.1 reads on and off (and yes, no) as booleans
    wanted = rule.wanted if isinstance(rule, AtLeast) else {bool: "true or false", int: "an integer",
                                                             float: "a number", str: "a string"}[hint]
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[hint]
    if not isinstance(value, kinds) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")
    if isinstance(rule, OneOf) and value not in rule.choices:
        raise ConfigError(f"{name} is {value!r}; choose one of {', '.join(rule.choices)}")
    if isinstance(rule, AtLeast) and not rule.holds(value):
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")
    return float(value) if hint is float else value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = get_type_hints(cls, include_extras=True)
    for key in data:
        if key not in hints:
            raise ConfigError(f"unknown config key '{where}{key}'{_suggest(str(key), list(hints), where)}")
    return cls(**{key: _typed(value, hints[key], f"{where}{key}") for key, value in data.items()})


def _suggest(key: str, choices: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    if close:
        return f" (did you mean '{where}{close[0]}'?)"
    return f"; valid keys here: {', '.join(where + c for c in choices)}"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """base with override laid over it, section by section (keys are checked when the Config is built)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader, plus floats in exponent notation that YAML 1.1 leaves as strings (1e-3, 1E-3, 2e4: no dot;
    1.0e3: no sign after the e), so a learning rate reads as a number however it is written."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; see configs/ for the shipped ones")
    try:
        data = _parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def parse_set(assignment: str) -> dict[str, Any]:
    """Turn 'feedback.lr=[0.1,0.2]' into {'feedback': {'lr': [0.1, 0.2]}} (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got '{assignment}'")
    key, raw = assignment.split("=", 1)
    try:
        value = _parse_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value '{raw}' is not valid YAML: {exc}") from None
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def default_config_path(dataset: str, algorithm: str) -> Path | None:
    """The shipped config when --config is not given: configs/<dataset>_<algorithm>.yaml, or
    configs/<dataset>.yaml, or for a dataset with neither (npz) the reference dataset's."""
    for name in (f"{dataset}_{algorithm}.yaml", f"{dataset}.yaml",
                 f"{REFERENCE_DATASET}_{algorithm}.yaml", f"{REFERENCE_DATASET}.yaml"):
        if (CONFIG_DIR / name).is_file():
            return CONFIG_DIR / name
    return None


def validate(cfg: Config) -> None:
    """Checks across fields, after every field has been checked on its own."""
    if not cfg.model.channels:
        raise ConfigError("model.channels is not set; a config file gives the network and its per-block lists "
                          "(start from one in configs/), or give them with --set model.channels=[32,64,64]")
    check_drl_settings(cfg)
    for name, section in (("feedback", cfg.feedback), ("forward", cfg.forward)):
        if len(section.betas) != 2 or not all(b < 1 for b in section.betas):
            raise ConfigError(f"{name}.betas must be two numbers in [0, 1), got {list(section.betas)}")
    iterations = cfg.feedback.iterations
    if cfg.algorithm == "parallel_dtp" and any(k != 1 for k in iterations):
        raise ConfigError(
            f"parallel_dtp takes one fused feedback step per batch, but feedback.iterations is {list(iterations)}; "
            f"set every entry to 1 (e.g. --set feedback.iterations={[1] * len(iterations)}) or use "
            f"configs/<dataset>_parallel_dtp.yaml"
        )


def check_block_lists(cfg: Config, n_blocks: int) -> None:
    """Per-block lists must match the network exactly: no silent truncation or repetition."""
    trained = f"Q_0..Q_{n_blocks - 1}" if cfg.algorithm == "drl" else f"blocks 1..{n_blocks}"
    for key in PER_BLOCK_KEYS:
        values = getattr(cfg.feedback, key)
        if len(values) != n_blocks:
            raise ConfigError(
                f"feedback.{key} has {len(values)} entries but the network has {n_blocks} trainable "
                f"feedback blocks ({trained}); give exactly one value per block in forward order, "
                f"e.g. --set feedback.{key}=[...]"
            )


def check_forward_lists(cfg: Config, n_blocks: int) -> None:
    """forward.lrs and forward.eps, when given, have one entry per forward block."""
    for key in ("lrs", "eps"):
        values = getattr(cfg.forward, key)
        if values and len(values) != n_blocks:
            raise ConfigError(f"forward.{key} has {len(values)} entries but the network has {n_blocks} forward "
                              f"blocks (F_0..F_{n_blocks - 1}); give one value per block, or none")


def build(data: dict[str, Any]) -> Config:
    """A Config from nested dicts (a YAML file's, a checkpoint's), every key and value checked."""
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def resolve(
    config_path: str | None,
    overrides: dict[str, Any],
    sets: list[str],
    base: dict[str, Any] | None = None,
) -> Config:
    """Build the run config: defaults <- base (a resumed run's config) or YAML file <- flags <- --set."""
    # A resumed run's config is laid over the defaults, so keys added since it was written take their defaults.
    data: dict[str, Any] = dict(base) if base is not None else {}
    if config_path is None and base is None:
        found = default_config_path(overrides.get("dataset") or Config.dataset,
                                    overrides.get("algorithm") or Config.algorithm)
        config_path = str(found) if found else None
    if config_path is not None:
        data = merge(data, load_yaml(config_path))
    data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    for assignment in sets:
        data = merge(data, parse_set(assignment))
    return build(data)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
