"""Sweeps: a grid of config settings × seeds, read from a YAML sweep file, expanded into one run each.

A sweep file names the training script, its base flags, a `grid` of config keys with a list of values
each, the `seeds` and an output root. Every run is the script with the base flags, `--seed`, one
`--set key=value` per grid key, `--out` its own directory and `--resume auto`, so running a sweep again
resumes what was interrupted. Every grid point is checked by building its config the way the scripts
do, so a bad key or value stops the sweep, with `--set`'s own message, before anything runs.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dtp import config as config_lib
from dtp.cli import add_parallel_flags, build_parser, resolve_run
from dtp.errors import ConfigError, UserError

SWEEP_KEYS = ("script", "nproc", "args", "grid", "seeds", "out")
SCRIPTS = ("train_sequential.py", "train_parallel.py")
ROOT = config_lib.CONFIG_DIR.parent
SWEEP_FLAGS = ("--out", "--resume", "--seed")  # flags the sweep gives every run itself
MAX_NAME = 80  # longer setting names keep their start and get a hash of the whole
BASE_SETTING = "base"  # the name of a grid with no keys


@dataclass(frozen=True)
class Sweep:
    """A sweep file, checked."""

    path: Path
    script: str
    nproc: int  # ranks for train_parallel.py (torchrun --nproc_per_node); 1 for train_sequential.py
    args: tuple[str, ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]  # (config key, its values), in file order
    seeds: tuple[int, ...]
    out: Path


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a grid point (its setting) and a seed."""

    setting: str  # the grid point's directory name, shared by its seeds
    values: tuple[tuple[str, Any], ...]  # (config key, value) of the grid point
    seed: int
    out_dir: Path
    train_args: tuple[str, ...]  # the script's flags, without --out and --resume

    def script_args(self) -> list[str]:
        """Every flag the script gets when the sweep itself starts the run."""
        return [*self.train_args, "--out", str(self.out_dir), "--resume", "auto"]


def set_value(value: Any) -> str:
    """A grid value as `--set` reads it back (YAML flow style: 1.0e-05, [0.1, 0.2], adam, true)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def value_name(value: Any) -> str:
    """A grid value as it appears in a directory name: 1e-05, 0.1_0.2 for a list."""
    if isinstance(value, (list, tuple)):
        return "_".join(value_name(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(value))


def setting_name(values: tuple[tuple[str, Any], ...]) -> str:
    """`key=value,key=value`, readable; names over MAX_NAME characters keep their start plus a short hash."""
    if not values:
        return BASE_SETTING
    name = ",".join(f"{key}={value_name(value)}" for key, value in values)
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ConfigError(f"sweep file {path}: {message}")


def _read_mapping(path: Path) -> dict[str, Any]:
    _require(path.is_file(), path, "does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=config_lib.ConfigLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {exc}") from None
    _require(isinstance(data, dict), path, "must hold a mapping of keys")
    for key in data:
        close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(SWEEP_KEYS)}"
        _require(key in SWEEP_KEYS, path, f"unknown key '{key}'{hint}")
    return data


def load_sweep(path: str | Path) -> Sweep:
    """The sweep file at `path`, each key checked (the grid's config keys are checked by `expand`)."""
    path = Path(path)
    data = _read_mapping(path)
    script = data.get("script", SCRIPTS[0])
    _require(script in SCRIPTS, path, f"script is {script!r}; choose one of {', '.join(SCRIPTS)}")
    nproc = data.get("nproc", 1)
    _require(isinstance(nproc, int) and not isinstance(nproc, bool) and nproc >= 1, path,
             f"nproc must be a positive integer, got {nproc!r}")
    _require(nproc == 1 or script == "train_parallel.py", path, "nproc above 1 needs script: train_parallel.py")
    args = data.get("args", [])
    _require(isinstance(args, list) and all(isinstance(a, (str, int, float)) for a in args), path,
             "args must be a list of flags and values, e.g. [--dataset, shapes, --epochs, 4]")
    args = tuple(str(a) for a in args)
    for flag in SWEEP_FLAGS:
        _require(not any(a == flag or a.startswith(flag + "=") for a in args), path,
                 f"args must not give {flag}: the sweep sets it for every run")
    grid = data.get("grid") or {}
    _require(isinstance(grid, dict), path, "grid must map config keys to lists of values")
    for key, values in grid.items():
        _require(isinstance(values, list) and len(values) > 0, path,
                 f"grid key '{key}' must have a non-empty list of values, got {values!r}")
    seeds = data.get("seeds", [0])
    _require(isinstance(seeds, list) and len(seeds) > 0
             and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
             and len(set(seeds)) == len(seeds), path, f"seeds must be a list of distinct integers, got {seeds!r}")
    _require(isinstance(data.get("out"), str), path, "out (the folder the runs go in) is required")
    return Sweep(path, script, nproc, args, tuple((str(k), tuple(v)) for k, v in grid.items()),
                 tuple(seeds), Path(data["out"]))


def _script_parser(script: str) -> argparse.ArgumentParser:
    """The script's own flags, with argparse's errors raised as UserError instead of exiting."""
    parser = build_parser(script)
    if script == "train_parallel.py":
        add_parallel_flags(parser)

    def fail(message: str) -> None:
        raise UserError(f"{script}: {message}")

    parser.error = fail  # type: ignore[method-assign]
    return parser


def _grid_points(sweep: Sweep) -> list[tuple[tuple[str, Any], ...]]:
    points: list[tuple[tuple[str, Any], ...]] = [()]
    for key, values in sweep.grid:
        points = [(*point, (key, value)) for point in points for value in values]
    return points


def _checked_args(sweep: Sweep, values: tuple[tuple[str, Any], ...]) -> tuple[str, ...]:
    """The grid point's flags, its config built as the script would build it.

    `--config` is made explicit, so that every launcher (the batch files pass a `--config` of their own)
    runs the same config; without one in `args`, it is the default lookup's for the grid point's
    dataset and algorithm, so a grid over `algorithm` gets each algorithm's config, as `--algorithm`
    would. Paths are relative to the folder sweep.py runs in, which the runs start in too.
    """
    sets = [a for key, value in values for a in ("--set", f"{key}={set_value(value)}")]
    args = [*sweep.args, *sets]
    try:
        parser = _script_parser(sweep.script)
        parsed = parser.parse_args([*args, "--out", str(sweep.out)])
        if parsed.config is None:
            grid = dict(values)
            found = config_lib.default_config_path(
                grid.get("dataset", parsed.dataset or config_lib.Config.dataset),
                grid.get("algorithm", parsed.algorithm or config_lib.Config.algorithm))
            args = ["--config", os.path.relpath(found), *args] if found is not None else args
            parsed = parser.parse_args([*args, "--out", str(sweep.out)])
        resolve_run(parsed)
    except UserError as exc:
        where = ", ".join(f"{k}={set_value(v)}" for k, v in values) or "args"
        raise type(exc)(f"sweep file {sweep.path}, {where}: {exc}") from None
    return tuple(args)


def expand(sweep: Sweep) -> list[SweepRun]:
    """Every run, seed by seed (each seed covers the whole grid before the next starts)."""
    points = _grid_points(sweep)
    checked = [_checked_args(sweep, point) for point in points]
    names = [setting_name(point) for point in points]
    clashes = sorted({name for name in names if names.count(name) > 1})
    _require(not clashes, sweep.path, f"two grid points give the same run name '{clashes[0] if clashes else ''}'")
    return [SweepRun(names[i], point, seed, sweep.out / names[i] / f"seed{seed}", (*checked[i], "--seed", str(seed)))
            for seed in sweep.seeds for i, point in enumerate(points)]


def summary_of(run: SweepRun) -> Path:
    return run.out_dir / "summary.json"
