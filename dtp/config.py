"""The run configuration: plain nested dicts, loaded from YAML and overridden from the command line.

DEFAULTS is the CIFAR-10 DTP reference (docs/design.md §7) and also the schema: a key that is not in it
is rejected, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from dtp.errors import ConfigError
from dtp.optim import OPTIMIZERS

DEFAULTS: dict[str, Any] = {
    "dataset": "cifar10",
    "data_dir": None,
    "download": False,
    "algorithm": "dtp",
    "seed": 0,
    "epochs": 90,
    "batch_size": 128,
    "eval_batch_size": 500,
    "mixed_precision": "no",
    "model": {
        "arch": "simple_vgg",  # simple_vgg, lenet, resnet18 or resnet34 (dtp/models.py); none has batch norm
        # simple_vgg, lenet: one conv-pool block per entry; resnet*: exactly 4 stage widths, the stem takes the first
        "channels": [128, 128, 256, 256, 512],
        "activation": "elu",  # every activation of the network, feedback included (the published ResNets: relu)
        "hidden": 512,  # lenet only: units of its hidden linear layer
    },
    "feedback": {
        "iterations": [20, 30, 35, 55, 20],
        "noise": [0.4, 0.4, 0.2, 0.2, 0.08],
        "lr": [1e-4, 3.5e-4, 8e-3, 8e-3, 0.18],
        "optimizer": "sgd",  # sgd or adam (parallel_dtp as published); momentum applies to sgd only
        "momentum": 0.9,
        "weight_decay": 0.0,
        "samples": 1,
        "init_symmetric": False,  # start G's weights at the transposes of F's (its biases as initialised)
    },
    "forward": {
        "lr": 0.08,
        "optimizer": "sgd",  # sgd or adam; momentum applies to sgd only
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "beta": 0.7,
        "scheduler": "cosine",  # per epoch: cosine (t_max, eta_min), step (step_size, gamma) or none
        "t_max": 85,
        "eta_min": 1e-5,
        "step_size": 30,
        "gamma": 0.1,
    },
    "early_stopping": {
        "patience": 0,  # stop after this many evaluations without a better val top-1; 0: never
        "min_delta": 0.0,
    },
    "log": {
        "every": 10,
        "angles_every": 50,
    },
}

PER_BLOCK_KEYS = ("iterations", "noise", "lr")
ALGORITHMS = ("dtp", "vanilla_dtp", "tp", "parallel_dtp", "bp")
ARCHS = ("simple_vgg", "lenet", "resnet18", "resnet34")
ACTIVATIONS = ("elu", "relu")
MIXED_PRECISION = ("no", "bf16")
SCHEDULERS = ("cosine", "step", "none")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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


def _suggest(key: str, choices: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    if close:
        return f" (did you mean '{where}{close[0]}'?)"
    return f"; valid keys here: {', '.join(where + c for c in choices)}"


def merge(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Return base updated with override, rejecting keys that base (the schema) does not have."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, list(base), where)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; give it a mapping, not {value!r}")
            merged[key] = merge(base[key], value, f"{path}.")
        else:
            merged[key] = value
    return merged


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
    """The shipped config for a dataset when --config is not given, e.g. configs/imagenet32_dtp.yaml."""
    for name in (f"{dataset}_{algorithm}.yaml", f"{dataset}.yaml"):
        if (CONFIG_DIR / name).is_file():
            return CONFIG_DIR / name
    return None


def _check_choice(cfg: dict[str, Any], key: str, choices: tuple[str, ...]) -> None:
    node, parts = cfg, key.split(".")
    for part in parts[:-1]:
        node = node[part]
    if node[parts[-1]] not in choices:
        raise ConfigError(f"{key} is {node[parts[-1]]!r}; choose one of {', '.join(choices)}")


def _check_positive(value: Any, name: str, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


def validate(cfg: dict[str, Any]) -> None:
    """Check value types and ranges that do not depend on the network."""
    _check_choice(cfg, "algorithm", ALGORITHMS)
    _check_choice(cfg, "model.arch", ARCHS)
    _check_choice(cfg, "model.activation", ACTIVATIONS)
    _check_choice(cfg, "mixed_precision", MIXED_PRECISION)
    _check_choice(cfg, "forward.scheduler", SCHEDULERS)
    _check_choice(cfg, "forward.optimizer", OPTIMIZERS)
    _check_choice(cfg, "feedback.optimizer", OPTIMIZERS)
    _check_positive(cfg["forward"]["step_size"], "forward.step_size", integer=True)
    patience = cfg["early_stopping"]["patience"]
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ConfigError(f"early_stopping.patience must be 0 (off) or a positive integer, got {patience!r}")
    if not isinstance(cfg["feedback"]["init_symmetric"], bool):
        raise ConfigError(f"feedback.init_symmetric must be true or false, got {cfg['feedback']['init_symmetric']!r}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        _check_positive(cfg[key], key, integer=True)
    _check_positive(cfg["feedback"]["samples"], "feedback.samples", integer=True)
    for key in ("every", "angles_every"):
        _check_positive(cfg["log"][key], f"log.{key}", integer=True)
    _check_positive(cfg["forward"]["lr"], "forward.lr", integer=False)
    channels = cfg["model"]["channels"]
    if not isinstance(channels, list) or not channels:
        raise ConfigError(f"model.channels must be a non-empty list of integers, got {channels!r}")
    for c in channels:
        _check_positive(c, "every entry of model.channels", integer=True)
    _check_positive(cfg["model"]["hidden"], "model.hidden", integer=True)
    for key in PER_BLOCK_KEYS:
        values = cfg["feedback"][key]
        if not isinstance(values, list):
            raise ConfigError(f"feedback.{key} must be a list with one value per feedback block, got {values!r}")
        for v in values:
            _check_positive(v, f"every entry of feedback.{key}", integer=key == "iterations")
    iterations = cfg["feedback"]["iterations"]
    if cfg["algorithm"] == "parallel_dtp" and any(k != 1 for k in iterations):
        raise ConfigError(
            f"parallel_dtp takes one fused feedback step per batch, but feedback.iterations is {iterations}; set "
            f"every entry to 1 (e.g. --set feedback.iterations={[1] * len(iterations)}) or use "
            f"configs/<dataset>_parallel_dtp.yaml"
        )


def check_block_lists(cfg: dict[str, Any], n_blocks: int) -> None:
    """Per-block lists must match the network exactly: no silent truncation or repetition."""
    for key in PER_BLOCK_KEYS:
        values = cfg["feedback"][key]
        if len(values) != n_blocks:
            raise ConfigError(
                f"feedback.{key} has {len(values)} entries but the network has {n_blocks} trainable "
                f"feedback blocks (blocks 1..{n_blocks}); give exactly one value per block in forward order, "
                f"e.g. --set feedback.{key}=[...]"
            )


def resolve(
    config_path: str | None,
    overrides: dict[str, Any],
    sets: list[str],
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the run config: base (defaults or a resumed run's config) <- YAML file <- flags <- --set."""
    # A resumed run's config is laid over the defaults, so keys added since it was written take their defaults.
    cfg = merge(DEFAULTS, base) if base is not None else copy.deepcopy(DEFAULTS)
    if config_path is None and base is None:
        dataset = overrides.get("dataset") or cfg["dataset"]
        algorithm = overrides.get("algorithm") or cfg["algorithm"]
        found = default_config_path(dataset, algorithm)
        config_path = str(found) if found else None
    if config_path is not None:
        cfg = merge(cfg, load_yaml(config_path))
    cfg = merge(cfg, {k: v for k, v in overrides.items() if v is not None})
    for assignment in sets:
        cfg = merge(cfg, parse_set(assignment))
    validate(cfg)
    return cfg


def to_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
